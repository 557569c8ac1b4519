"""`deepspec eval --draft DIR` on a draft directory in the layout of DeepSpec's released checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from deepspec.config import load_config
from deepspec.drafts.checkpoint import INDEX_NAME, checkpoint_content_hash, save_reference_draft
from deepspec.drafts.dspark import build_draft
from deepspec.drafts.eagle3 import build_eagle3_draft
from deepspec.pipeline import stage_fingerprints, stage_output
from tests.integration.pipeline_helpers import tiny_pipeline_config

pytestmark = pytest.mark.integration


def deepspec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepspec.cli", *args], capture_output=True, text=True, timeout=600, check=False
    )


def save_released_layout_draft(target: torch.nn.Module, directory: Path, seed: int) -> Path:
    draft = build_draft(
        target,
        layer_ids=[0, 1],
        block_size=3,
        num_layers=1,
        num_anchors=8,
        markov_rank=8,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=target.config.vocab_size - 1,
        seed=seed,
    )
    # A small shard limit forces the sharded layout: shards plus model.safetensors.index.json.
    return save_reference_draft(draft, directory, max_shard_size=20_000)


def save_released_layout_eagle3(target: torch.nn.Module, directory: Path, seed: int) -> Path:
    draft = build_eagle3_draft(target, layer_ids=[0, 1], num_layers=1, ttt_length=3, step_loss_decay=0.8, seed=seed)
    return save_reference_draft(draft, directory, max_shard_size=20_000)


SAVERS = {"Qwen3DSparkModel": save_released_layout_draft, "Qwen3Eagle3Model": save_released_layout_eagle3}


@pytest.fixture(scope="module")
def prompts_ready(tiny_target_dir, tmp_path_factory):
    """A config whose prompts stage has run (eval reads its held-out records)."""
    directory = tmp_path_factory.mktemp("external-eval")
    config_path, config = tiny_pipeline_config(
        tiny_target_dir, directory / "runs", directory, eval={"temperatures": [0.0], "compare_untrained": True}
    )
    completed = deepspec("prompts", "--config", str(config_path))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return directory, config_path


@pytest.mark.parametrize("architecture", list(SAVERS))
def test_eval_draft_reports_external_draft(prompts_ready, tiny_target_dir, tmp_path, architecture):
    _, config_path = prompts_ready
    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    draft_dir = SAVERS[architecture](target, tmp_path / "released_tiny", seed=3)
    assert (draft_dir / INDEX_NAME).is_file()

    completed = deepspec("eval", "--config", str(config_path), "--draft", str(draft_dir))
    assert completed.returncode == 0, completed.stdout + completed.stderr

    config = load_config(config_path, [f"eval.draft={draft_dir}"])
    output = stage_output(config, "eval")
    assert (output / "_MANIFEST.json").is_file()
    assert output != stage_output(load_config(config_path), "eval")
    report = json.loads((output / "report.json").read_text(encoding="utf-8"))
    assert report["draft"]["source"] == "eval.draft"
    assert report["draft"]["architecture"] == architecture
    assert report["draft"]["path"] == str(draft_dir.resolve())
    assert report["draft"]["sha256"] == checkpoint_content_hash(draft_dir)
    assert report["block_size"] == 3
    assert report["target_layer_ids"] == [0, 1]
    assert report["drafts"] == ["trained", "untrained"]
    for benchmark in report["benchmarks"]:
        assert report["results"]["trained"]["0.0"][benchmark]["tau"] >= 1.0
    markdown = (output / "report.md").read_text(encoding="utf-8")
    assert f"Draft `{draft_dir.resolve()}` ({architecture}, from the eval.draft" in markdown
    assert architecture in completed.stdout + completed.stderr

    # The train stage never ran: an external draft needs only the prompts output.
    assert not stage_output(config, "train").exists()


def test_eval_draft_fingerprint_follows_content(prompts_ready, tiny_target_dir, tmp_path):
    _, config_path = prompts_ready
    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    draft_dir = save_released_layout_draft(target, tmp_path / "draft", seed=3)
    first = stage_fingerprints(load_config(config_path, [f"eval.draft={draft_dir}"]))["eval"]

    moved = draft_dir.rename(tmp_path / "moved")
    assert stage_fingerprints(load_config(config_path, [f"eval.draft={moved}"]))["eval"] == first

    save_released_layout_draft(target, moved, seed=4)
    assert stage_fingerprints(load_config(config_path, [f"eval.draft={moved}"]))["eval"] != first


def test_eval_draft_for_other_target_rejected(prompts_ready, tmp_path):
    _, config_path = prompts_ready
    torch.manual_seed(0)
    other = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=200,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    )
    draft_dir = save_released_layout_draft(other, tmp_path / "other", seed=0)
    completed = deepspec("eval", "--config", str(config_path), "--draft", str(draft_dir))
    assert completed.returncode == 2
    assert "vocab_size: draft 200 != target" in completed.stdout + completed.stderr


def test_eval_draft_missing_directory_named(prompts_ready, tmp_path):
    _, config_path = prompts_ready
    completed = deepspec("eval", "--config", str(config_path), "--draft", str(tmp_path / "absent"))
    assert completed.returncode == 2
    assert "eval.draft=" in completed.stdout + completed.stderr
    assert "has no config.json" in completed.stdout + completed.stderr


def test_trained_draft_in_released_layout_keeps_tau(tiny_target_dir, tmp_path):
    """A pipeline-trained draft, rounded to bf16, evaluates the same from our layout and the released one."""
    from deepspec.drafts.checkpoint import load_draft, save_draft

    config_path, config = tiny_pipeline_config(
        tiny_target_dir,
        tmp_path / "runs",
        tmp_path,
        train={"max_steps": 6},
        eval={"temperatures": [0.0], "compare_untrained": False},
    )
    completed = deepspec("run", "--config", str(config_path))
    assert completed.returncode == 0, completed.stdout + completed.stderr

    draft = load_draft(stage_output(config, "train") / "draft")
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).to(torch.float32))
    ours = save_draft(draft, tmp_path / "ours")
    released = save_reference_draft(draft, tmp_path / "released", max_shard_size=20_000)
    assert (released / INDEX_NAME).is_file()

    taus = []
    for directory in (ours, released):
        result = deepspec("eval", "--config", str(config_path), "--draft", str(directory))
        assert result.returncode == 0, result.stdout + result.stderr
        external = load_config(config_path, [f"eval.draft={directory}"])
        report = json.loads((stage_output(external, "eval") / "report.json").read_text())
        taus.append({name: entry["tau"] for name, entry in report["results"]["trained"]["0.0"].items()})
    assert taus[0] == taus[1]
    assert all(tau >= 1.0 for tau in taus[1].values())

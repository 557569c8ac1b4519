"""An Eagle3 draft through the pipeline on the tiny target: cache, train, save, load and evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deepspec.cache.reader import CacheReader, collate
from deepspec.cache.stage import run_cache
from deepspec.config import validate_config
from deepspec.data.stage import run_prompts
from deepspec.drafts.checkpoint import load_draft
from deepspec.drafts.eagle3 import Qwen3Eagle3Model, build_eagle3_draft
from deepspec.drafts.eagle3_loss import eagle3_loss
from deepspec.eval.stage import run_eval
from deepspec.pipeline import stage_output
from deepspec.regen.stage import run_regen
from deepspec.runtime import configure_runtime
from deepspec.targets.loading import load_target
from deepspec.train.checkpoint import checkpoint_name
from deepspec.train.distributed import DistEnv
from deepspec.train.stage import run_train
from deepspec.train.trainer import Trainer
from tests.integration.pipeline_helpers import tiny_pipeline_config, tiny_pipeline_raw

pytestmark = pytest.mark.integration

TTT_LENGTH = 3


@pytest.fixture(scope="module")
def trained(tiny_target_dir, tmp_path_factory):
    """A finished prompts -> regen -> cache -> train -> eval chain with an Eagle3 draft."""
    configure_runtime()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("eagle3-pipeline")
    _, config = tiny_pipeline_config(
        tiny_target_dir,
        work / "runs",
        work,
        cache={"layer_ids": [-1, 0, 1]},
        draft={"algorithm": "eagle3", "num_layers": 1, "ttt_length": TTT_LENGTH, "markov_rank": 0},
        train={"max_steps": 24, "lr": 3e-3, "checkpoint_every": 100, "log_every": 100},
        eval={"temperatures": [0.0, 1.0], "compare_untrained": True},
    )
    run_prompts(config)
    run_regen(config)
    run_cache(config)
    run_train(config)
    run_eval(config)
    return config


def cache_loss(draft: Qwen3Eagle3Model, config, count: int = 16) -> float:
    """Return the Eagle3 loss of ``draft`` on the first ``count`` cached samples as one batch."""
    cache = CacheReader(stage_output(config, "cache"))
    batch = collate([cache[index] for index in range(min(count, len(cache)))])
    with torch.no_grad():
        output = draft.forward_train(
            input_ids=batch["input_ids"],
            target_hidden_states=batch["target_hidden"].float(),
            loss_mask=batch["loss_mask"],
            attention_mask=batch["attention_mask"],
            target_last_hidden_states=batch["target_last_hidden"].float(),
        )
    return float(eagle3_loss(output, step_loss_decay=config.draft.step_loss_decay).loss)


def test_training_lowers_loss(trained):
    lines = (stage_output(trained, "train") / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 24
    first = json.loads(lines[0])
    assert {f"ploss_{step}" for step in range(TTT_LENGTH)} <= first.keys()
    assert "tau_greedy" in first

    draft = load_draft(stage_output(trained, "train") / "draft")
    untrained = build_eagle3_draft(
        load_target(trained), layer_ids=[-1, 0, 1], ttt_length=TTT_LENGTH, seed=trained.train.seed
    )
    assert cache_loss(draft, trained) < cache_loss(untrained, trained)


def test_saved_draft_loads_with_reference_names(trained):
    draft_dir = stage_output(trained, "train") / "draft"
    config = json.loads((draft_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Qwen3Eagle3Model"]
    assert config["ttt_length"] == TTT_LENGTH
    assert config["target_layer_ids"] == [-1, 0, 1]
    model = load_draft(draft_dir)
    assert isinstance(model, Qwen3Eagle3Model)
    stored = load_file(draft_dir / "model.safetensors")
    assert "layers.0.hidden_norm.weight" in stored
    assert "fc.weight" in stored
    for name, tensor in stored.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_eval_reports_tau_per_benchmark(trained):
    report = json.loads((stage_output(trained, "eval") / "report.json").read_text(encoding="utf-8"))
    assert report["block_size"] == TTT_LENGTH
    assert set(report["drafts"]) == {"trained", "untrained"}
    for draft, per_temperature in report["results"].items():
        assert set(per_temperature) == {"0.0", "1.0"}
        for temperature, rows in per_temperature.items():
            for benchmark in report["benchmarks"]:
                tau = rows[benchmark]["tau"]
                assert tau is not None, (draft, temperature, benchmark)
                assert 1.0 <= tau <= TTT_LENGTH + 1, (draft, temperature, benchmark, tau)


def test_trainer_resumes_eagle3_checkpoint(tiny_target_dir, tmp_path):
    raw = tiny_pipeline_raw(tiny_target_dir, tmp_path)
    raw["draft"] = {"algorithm": "eagle3", "ttt_length": 2}
    raw["cache"]["layer_ids"] = [0, 1]
    raw["train"].update({"max_steps": 3, "global_batch_size": 2, "per_device_batch_size": 2, "checkpoint_every": 2})
    config = validate_config(raw)
    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    hidden = target.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    samples = [
        {
            "input_ids": torch.randint(5, 100, (12,), generator=generator),
            "loss_mask": torch.tensor([0] * 4 + [1] * 8, dtype=torch.uint8),
            "target_hidden": torch.randn(12, 2 * hidden, generator=generator),
            "target_last_hidden": torch.randn(12, hidden, generator=generator),
        }
        for _ in range(4)
    ]
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    (tmp_path / "run").mkdir()

    def fresh_draft():
        return build_eagle3_draft(target, layer_ids=[0, 1], ttt_length=2, seed=0)

    first = Trainer(config, env, samples, fresh_draft(), tmp_path / "run")
    summary = first.train()
    assert summary.steps == 3
    assert summary.skipped_steps == 0

    resumed = Trainer(config, env, samples, fresh_draft(), tmp_path / "run")
    resumed.maybe_resume()
    assert resumed.state.step == 2
    checkpoint = load_draft(tmp_path / "run" / "checkpoints" / checkpoint_name(2) / "draft")
    for name, tensor in checkpoint.state_dict().items():
        assert torch.equal(resumed.draft.state_dict()[name], tensor), name

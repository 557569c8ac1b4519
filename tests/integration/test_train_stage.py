import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from deepspec.cache.stage import run_cache
from deepspec.config import validate_config
from deepspec.data.stage import run_prompts
from deepspec.drafts.dspark import build_draft
from deepspec.pipeline import stage_output
from deepspec.regen.stage import run_regen
from deepspec.train.distributed import DistEnv
from deepspec.train.trainer import Trainer
from tests.integration.pipeline_helpers import tiny_pipeline_config, tiny_pipeline_raw

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream(tiny_target_dir, tmp_path_factory):
    """A finished prompts -> regen -> cache chain on the tiny target."""
    work = tmp_path_factory.mktemp("train-upstream")
    path, config = tiny_pipeline_config(tiny_target_dir, work / "runs", work, train={"max_steps": 40})
    torch.set_num_threads(1)
    run_prompts(config)
    run_regen(config)
    run_cache(config)
    return path, config


def run_train_process(config_path, *extra, env=None):
    command = [sys.executable, "-m", "deepspec.cli", "train", "--config", str(config_path), *extra]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )


def final_weights(config):
    return load_file(stage_output(config, "train") / "draft" / "model.safetensors")


def test_killed_training_resumes_from_saved_step(upstream, tmp_path):
    config_path, config = upstream
    reference_root = tmp_path / "uninterrupted"
    reference_root.mkdir()
    for name in ("prompts", "regen", "cache"):
        os.symlink(stage_output(config, name).parent, reference_root / name)

    uninterrupted = run_train_process(config_path, "--set", f"storage.root={reference_root}")
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stdout.read()

    process = run_train_process(config_path)
    pointer = stage_output(config, "train") / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not pointer.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if process.poll() is not None:
        pytest.fail("training finished before a checkpoint could be interrupted; raise train.max_steps")
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved_step = json.loads(pointer.read_text())["step"]
    assert 0 < saved_step < 40
    assert not (stage_output(config, "train") / "_MANIFEST.json").exists()

    resumed = run_train_process(config_path)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    summary = json.loads((stage_output(config, "train") / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["resumed_from_step"] >= saved_step

    expected = load_file(reference_root / "train" / stage_output(config, "train").name / "draft" / "model.safetensors")
    resumed_weights = final_weights(config)
    assert expected.keys() == resumed_weights.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0, msg=name)


def test_second_run_is_up_to_date(upstream):
    config_path, config = upstream
    first = run_train_process(config_path)
    assert first.wait(timeout=300) == 0
    manifest = (stage_output(config, "train") / "_MANIFEST.json").read_bytes()
    second = run_train_process(config_path)
    log = second.communicate(timeout=120)[0]
    assert second.returncode == 0
    assert "up to date" in log
    assert (stage_output(config, "train") / "_MANIFEST.json").read_bytes() == manifest


def test_batch_without_supervised_tokens_skips_the_step(tiny_target_dir, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    raw = tiny_pipeline_raw(tiny_target_dir, tmp_path)
    raw["train"].update({"max_steps": 1, "global_batch_size": 2, "per_device_batch_size": 2})
    config = validate_config(raw)
    target = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    draft = build_draft(
        target,
        layer_ids=[0, 1],
        block_size=3,
        num_layers=1,
        num_anchors=4,
        markov_rank=8,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=3,
        seed=0,
    )
    hidden = target.config.hidden_size
    samples = [
        {
            "input_ids": torch.arange(10, dtype=torch.int64) + 5,
            "loss_mask": torch.zeros(10, dtype=torch.uint8),
            "target_hidden": torch.randn(10, 2 * hidden),
            "target_last_hidden": torch.randn(10, hidden),
        }
        for _ in range(2)
    ]
    before = {name: param.detach().clone() for name, param in draft.named_parameters()}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    trainer = Trainer(config, env, samples, draft, tmp_path)
    with caplog.at_level("WARNING"):
        summary = trainer.train()
    assert summary.skipped_steps == 1
    assert "no supervised tokens on any rank" in caplog.text
    for name, param in draft.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)

import json
import subprocess
import sys

import pytest

from deepspec.pipeline import STAGES, stage_output
from tests.integration.pipeline_helpers import tiny_pipeline_config

pytestmark = pytest.mark.integration


def deepspec(*args, check=True):
    completed = subprocess.run(
        [sys.executable, "-m", "deepspec.cli", *args], capture_output=True, text=True, timeout=600, check=False
    )
    if check and completed.returncode != 0:
        pytest.fail(f"deepspec {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed


def test_run_twice_second_run_skips_every_stage(tiny_target_dir, tmp_path):
    config_path, config = tiny_pipeline_config(
        tiny_target_dir,
        tmp_path / "runs",
        tmp_path,
        train={"max_steps": 4, "nproc_per_node": 2},
        cache={"nproc_per_node": 2},
        eval={"temperatures": [0.0, 1.0], "compare_untrained": True},
    )
    first = deepspec("run", "--config", str(config_path))
    for stage in STAGES:
        assert (stage_output(config, stage) / "_MANIFEST.json").is_file(), stage
        assert (stage_output(config, stage) / "config.yaml").is_file(), stage
    assert first.stdout.count("## Accepted length tau") == 1

    report = json.loads((stage_output(config, "eval") / "report.json").read_text())
    assert report, "empty report"
    samples = [json.loads(line) for line in (stage_output(config, "eval") / "samples.jsonl").read_text().splitlines()]
    assert samples, "no decoded sample"
    for sample in samples:
        assert len(sample["confidence_rounds"]) == sample["rounds"]
        for round_detail in sample["confidence_rounds"]:
            assert len(round_detail["logits"]) == round_detail["proposed"]
            assert 0 <= round_detail["accepted"] <= round_detail["proposed"]

    manifests = {stage: (stage_output(config, stage) / "_MANIFEST.json").read_bytes() for stage in STAGES}
    second = deepspec("run", "--config", str(config_path))
    assert second.stdout.count("## Accepted length tau") == 1
    for stage in STAGES:
        assert f"{stage}: up to date" in second.stdout, second.stdout
        assert (stage_output(config, stage) / "_MANIFEST.json").read_bytes() == manifests[stage]

    status = deepspec("status", "--config", str(config_path)).stdout
    assert all(f"{stage:<8} done" in status for stage in STAGES), status
    waited = deepspec("wait", "eval", "--config", str(config_path), "--timeout", "5")
    assert waited.returncode == 0


def test_bad_config_exits_with_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  sources:\n    - name: gsm8k\ntrain:\n  lr: fast\n", encoding="utf-8")
    completed = deepspec("prompts", "--config", str(path), check=False)
    assert completed.returncode == 2
    assert "train.lr" in completed.stdout
    assert "'fast'" in completed.stdout


def test_downstream_stage_names_missing_upstream(tiny_target_dir, tmp_path):
    config_path, _ = tiny_pipeline_config(tiny_target_dir, tmp_path / "runs", tmp_path)
    completed = deepspec("train", "--config", str(config_path), check=False)
    assert completed.returncode == 2
    assert "no finished cache output" in completed.stdout


def test_wait_times_out_when_stage_missing(tiny_target_dir, tmp_path):
    config_path, _ = tiny_pipeline_config(tiny_target_dir, tmp_path / "runs", tmp_path)
    completed = deepspec(
        "wait", "cache", "--config", str(config_path), "--timeout", "0.5", "--interval", "0.1", check=False
    )
    assert completed.returncode == 1
    assert "timed out" in completed.stdout


def test_failed_stage_exits_without_traceback(tmp_path):
    rows = tmp_path / "bad.jsonl"
    rows.write_text('{"messages": []}\n{"messages": [{"role": "assistant", "content": "Hi"}]}\nnot json\n')
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data:\n  sources:\n    - name: bad\n      path: {rows}\nstorage:\n  root: {tmp_path / 'runs'}\n",
        encoding="utf-8",
    )
    completed = deepspec("prompts", "--config", str(path), check=False)
    assert completed.returncode == 1
    assert "kept 0/3 records" in completed.stdout
    assert "data.min_kept_fraction" in completed.stdout
    assert "Traceback" not in completed.stdout + completed.stderr
    assert not list((tmp_path / "runs").rglob("_MANIFEST.json"))


def test_missing_source_file_exits_with_message(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data:\n  sources:\n    - name: mine\n      path: {tmp_path / 'absent.jsonl'}\n"
        f"storage:\n  root: {tmp_path / 'runs'}\n",
        encoding="utf-8",
    )
    completed = deepspec("prompts", "--config", str(path), check=False)
    assert completed.returncode == 2
    assert "absent.jsonl" in completed.stdout
    assert "Traceback" not in completed.stdout + completed.stderr


def test_last_layer_rejected_before_any_stage_runs(tiny_target_dir, tmp_path):
    config_path, _ = tiny_pipeline_config(tiny_target_dir, tmp_path / "runs", tmp_path, cache={"layer_ids": [0, 2]})
    completed = deepspec("run", "--config", str(config_path), check=False)
    assert completed.returncode == 2
    assert "last layer" in completed.stdout
    assert not (tmp_path / "runs").exists()

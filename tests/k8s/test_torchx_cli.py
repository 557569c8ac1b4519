"""The ``torchx`` command in the repository root: .torchxconfig defaults, dry runs, and a real local training run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspec.cache.stage import run_cache
from deepspec.data.stage import run_prompts
from deepspec.pipeline import stage_output
from deepspec.regen.stage import run_regen
from tests.integration.pipeline_helpers import tiny_pipeline_config

REPO = Path(__file__).resolve().parents[2]
TORCHX = Path(sys.executable).parent / "torchx"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _torchx(
    args: list[str], cwd: Path, home: Path, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the torchx CLI with a clean HOME, so only the project's .torchxconfig applies."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TORCHXCONFIG", "DEEPSPEC_CONFIG", *LAUNCH_VARIABLES)
    }
    # local_cwd runs `torchrun` from PATH, as in an activated virtual environment.
    path = os.pathsep.join([str(TORCHX.parent), clean.get("PATH", "")])
    clean.update(HOME=str(home), HF_HUB_OFFLINE="1", PATH=path, **env)
    return subprocess.run(
        [str(TORCHX), *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_dist_ddp_dryrun_uses_project_module(tmp_path: Path) -> None:
    result = _torchx(["run", "--dryrun", "dist.ddp", "-j", "1x8", "train"], REPO, tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "torchrun " in output
    assert "--nproc_per_node 8" in output
    assert "-m deepspec.cli train" in output
    # local_cwd requests run in the current directory; a cluster request would print a manifest.
    assert f"'cwd': '{REPO}'" in output
    assert "apiVersion" not in output


def test_default_scheduler_needs_project_config(tmp_path: Path) -> None:
    # Without .torchxconfig the installed pytorchjob plugin comes first and becomes TorchX's default.
    args = ["run", "--dryrun", "--workspace", "", "dist.ddp", "-j", "1x8", "--gpu", "8", "-m", "deepspec.cli", "train"]
    result = _torchx(args, tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kind: PyTorchJob" in result.stdout


def test_pytorchjob_dryrun_needs_no_flags(tmp_path: Path) -> None:
    args = ["run", "--dryrun", "-s", "pytorchjob", "deepspec.train", "-j", "2x8", "--config", "/data/pipeline.yaml"]
    result = _torchx(args, REPO, tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "kind: PyTorchJob" in output
    assert "nprocPerNode: '8'" in output
    assert "-m deepspec.cli train --config /data/pipeline.yaml" in output


def test_volcano_dryrun_uses_project_queue(tmp_path: Path) -> None:
    args = ["run", "--dryrun", "-s", "kubernetes", "deepspec.cache", "-j", "2x8", "--config", "/data/pipeline.yaml"]
    result = _torchx(args, REPO, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "apiVersion: batch.volcano.sh/v1alpha1" in result.stdout
    assert "queue: default" in result.stdout


@pytest.mark.integration
def test_local_training_run_through_torchx(tiny_target_dir: Path, tmp_path: Path) -> None:
    config_path, config = tiny_pipeline_config(
        tiny_target_dir,
        tmp_path / "runs",
        tmp_path,
        train={"max_steps": 4, "global_batch_size": 4, "per_device_batch_size": 2, "checkpoint_every": 2},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_prompts(config)
        run_regen(config)
        run_cache(config)
    finally:
        torch.set_num_threads(threads)

    logs = tmp_path / "torchx-logs"
    args = ["run", "-s", "local_cwd", "-cfg", f"log_dir={logs}", "dist.ddp", "-j", "1x2", "train"]
    result = _torchx(args, REPO, tmp_path, timeout=300, DEEPSPEC_CONFIG=str(config_path), OMP_NUM_THREADS="1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCEEDED" in output
    train_output = stage_output(config, "train")
    assert (train_output / "_MANIFEST.json").is_file(), output
    summary = json.loads((train_output / "summary.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == 2
    assert summary["steps"] == 4
    shutil.rmtree(logs, ignore_errors=True)

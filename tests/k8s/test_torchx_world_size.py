"""WORLD_SIZE must equal nodes x processes per node before a stage joins its process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepspec.launch.worldsize import WorldSizeError, check_world_size
from tests.integration.pipeline_helpers import tiny_pipeline_raw, write_config

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 1),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}, 2),
        (
            {
                "WORLD_SIZE": "16",
                "LOCAL_WORLD_SIZE": "8",
                "GROUP_WORLD_SIZE": "2",
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "8",
            },
            16,
        ),
        # Elastic ranges and nprocPerNode=auto declare no fixed count, so only torchrun's shape is checked.
        ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "PET_NNODES": "1:2"}, 8),
        ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "PET_NPROC_PER_NODE": "auto"}, 8),
        # A manual launch without torchrun or an operator cannot be checked.
        ({"WORLD_SIZE": "2", "RANK": "1"}, 2),
        # A PyTorchJob pod that runs the stage directly with one replica is consistent.
        ({"WORLD_SIZE": "1", "PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"}, 1),
    ],
)
def test_consistent_launch_passes(environ: dict[str, str], expected: int) -> None:
    assert check_world_size(environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"},
            "torchrun started GROUP_WORLD_SIZE=2 nodes x LOCAL_WORLD_SIZE=2 processes = 4",
        ),
        (
            {"WORLD_SIZE": "16", "PET_NNODES": "2", "PET_NPROC_PER_NODE": "8"},
            "not started by torchrun (LOCAL_WORLD_SIZE is unset)",
        ),
        (
            {
                "WORLD_SIZE": "8",
                "LOCAL_WORLD_SIZE": "4",
                "GROUP_WORLD_SIZE": "2",
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "8",
            },
            "PET_NNODES=2 x PET_NPROC_PER_NODE=8 = 16 processes",
        ),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer"),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE='0' must be at least 1"),
    ],
)
def test_mismatched_launch_raises(environ: dict[str, str], message: str) -> None:
    with pytest.raises(WorldSizeError) as caught:
        check_world_size(environ)
    assert message in str(caught.value)


def _run_stage(stage: str, config: Path, launch_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    env.update(launch_env)
    command = [sys.executable, "-m", "deepspec.cli", stage, "--config", str(config)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stage", ["train", "cache"])
def test_stage_exits_on_mismatch(stage: str, tiny_target_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_pipeline_raw(tiny_target_dir, tmp_path / "runs"))
    # A PyTorchJob with nprocPerNode 8 whose container started the stage without torchrun.
    launch = {"WORLD_SIZE": "16", "RANK": "0", "PET_NNODES": "2", "PET_NPROC_PER_NODE": "8"}
    result = _run_stage(stage, config, launch)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "WORLD_SIZE=16" in output
    assert "start the stage with `torchrun -m deepspec.cli <stage>`" in output

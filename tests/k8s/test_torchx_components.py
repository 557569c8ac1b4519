"""deepspec's TorchX components: registration next to the built-ins, and dry runs on local_cwd and kubernetes."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from torchx.runner import get_runner
from torchx.schedulers import get_scheduler_factories
from torchx.specs import AppDef
from torchx.specs.finder import get_component

REPO = Path(__file__).resolve().parents[2]
TORCHX = Path(sys.executable).parent / "torchx"
IMAGE = "registry.example/deepspec/gpu:1.0"
VOLCANO_CFG = {"queue": "default", "namespace": "deepspec", "validate_spec": False}


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSPEC_CONFIG", raising=False)


def _command(app: AppDef) -> list[str]:
    role = app.roles[0]
    assert role.entrypoint == "bash"
    assert role.args[0] == "-c"
    return shlex.split(role.args[1])


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_builtins_lists_deepspec_and_dist() -> None:
    result = subprocess.run([str(TORCHX), "builtins"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    listed = result.stdout
    for name in ("deepspec.train", "deepspec.cache", "deepspec.eval", "dist.ddp", "dist.torchrun", "utils.echo"):
        assert f" {name}\n" in listed, listed


def test_schedulers_include_pytorchjob_and_builtins() -> None:
    factories = get_scheduler_factories()
    for name in ("local_cwd", "kubernetes", "pytorchjob"):
        assert name in factories


@pytest.mark.parametrize("name", ["deepspec.train", "deepspec.cache", "deepspec.eval"])
def test_component_docstring_has_no_lint_errors(name: str) -> None:
    component = get_component(name)
    assert component.validation_errors == []
    assert component.description


@pytest.mark.parametrize(("stage", "nproc"), [("train", 8), ("cache", 4)])
def test_local_cwd_dryrun_runs_torchrun(stage: str, nproc: int, tmp_path: Path) -> None:
    config = str(tmp_path / "pipeline.yaml")
    args = ["-j", f"1x{nproc}", "--config", config, "--", "--set", "train.lr=3e-4"]
    info = get_runner().dryrun_component(f"deepspec.{stage}", args, "local_cwd", cfg={"log_dir": str(tmp_path)})
    command = _command(info.app)
    assert command[0] == "torchrun"
    assert _option(command, "--nproc_per_node") == str(nproc)
    assert _option(command, "--nnodes") == "1"
    assert _option(command, "--rdzv_endpoint") == "localhost:0"
    stage_part = command[command.index("-m") + 1 :]
    assert stage_part == ["deepspec.cli", stage, "--config", config, "--set", "train.lr=3e-4"]
    replica = info.request.role_params[stage][0]
    assert replica.args[:2] == ["bash", "-c"]


def test_config_comes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSPEC_CONFIG", "/data/configs/qwen3_4b.yaml")
    app = get_runner().dryrun_component("deepspec.train", ["-j", "1x2"], "local_cwd").app
    command = _command(app)
    assert _option(command, "--config") == "/data/configs/qwen3_4b.yaml"


def test_config_in_role_env_is_left_to_container() -> None:
    args = ["-j", "1x2", "--env", "DEEPSPEC_CONFIG=/etc/deepspec/pipeline.yaml"]
    app = get_runner().dryrun_component("deepspec.train", args, "local_cwd").app
    assert "--config" not in _command(app)
    assert app.roles[0].env["DEEPSPEC_CONFIG"] == "/etc/deepspec/pipeline.yaml"


def test_missing_config_names_the_fix() -> None:
    with pytest.raises(ValueError) as caught:
        get_runner().dryrun_component("deepspec.cache", ["-j", "1x8"], "local_cwd")
    assert "pass --config PATH" in str(caught.value)
    assert "DEEPSPEC_CONFIG" in str(caught.value)


def test_elastic_node_range_rejected() -> None:
    with pytest.raises(ValueError) as caught:
        get_runner().dryrun_component("deepspec.train", ["-j", "1:2x8", "--config", "c.yaml"], "local_cwd")
    assert "elastic node ranges are not supported" in str(caught.value)


def test_resources_follow_processes() -> None:
    app = get_runner().dryrun_component("deepspec.train", ["-j", "2x4", "--config", "c.yaml"], "local_cwd").app
    role = app.roles[0]
    assert role.num_replicas == 2
    assert role.resource.gpu == 4
    assert app.metadata["deepspec.ai/stage"] == "train"
    cpu_app = (
        get_runner()
        .dryrun_component("deepspec.train", ["-j", "1x2", "--gpu", "0", "--config", "c.yaml"], "local_cwd")
        .app
    )
    assert cpu_app.roles[0].resource.gpu == 0


def _sanitized(resource: Any) -> dict[str, Any]:
    return client.ApiClient().sanitize_for_serialization(resource)


@pytest.mark.parametrize("stage", ["train", "cache", "eval"])
def test_volcano_dryrun_pod_templates_validate(stage: str) -> None:
    args = ["--config", "/data/pipeline.yaml", "--image", IMAGE]
    if stage != "eval":
        args = ["-j", "2x8", *args]
    info = get_runner().dryrun_component(f"deepspec.{stage}", args, "kubernetes", cfg=VOLCANO_CFG, workspace=None)
    resource = _sanitized(info.request.resource)
    assert resource["apiVersion"] == "batch.volcano.sh/v1alpha1"
    tasks = resource["spec"]["tasks"]
    assert len(tasks) == (1 if stage == "eval" else 2)
    for task in tasks:
        template = client.V1PodTemplateSpec.model_validate(task["template"])
        assert template.metadata.labels["deepspec.ai/stage"] == stage
        container = template.spec.containers[0]
        assert container.image == IMAGE
        assert "/dev/shm" in [mount.mount_path for mount in container.volume_mounts]
        command = shlex.split(container.command[2])
        assert command[command.index("-m") + 1 : command.index("-m") + 3] == ["deepspec.cli", stage]


def test_volcano_multinode_rendezvous_uses_rank0_host() -> None:
    args = ["-j", "2x8", "--config", "/data/pipeline.yaml"]
    info = get_runner().dryrun_component("deepspec.train", args, "kubernetes", cfg=VOLCANO_CFG, workspace=None)
    tasks = _sanitized(info.request.resource)["spec"]["tasks"]
    first, second = (task["template"]["spec"]["containers"][0]["command"][2] for task in tasks)
    assert "--rdzv_endpoint ${TORCHX_RANK0_HOST:=localhost}:29500" in first
    # Volcano publishes the first task's host name to the other tasks.
    assert "--rdzv_endpoint ${VC_TRAIN_0_HOSTS:=localhost}:29500" in second


def test_volcano_template_validator_rejects_unknown_field() -> None:
    info = get_runner().dryrun_component(
        "deepspec.eval", ["--config", "c.yaml"], "kubernetes", cfg=VOLCANO_CFG, workspace=None
    )
    template = _sanitized(info.request.resource)["spec"]["tasks"][0]["template"]
    template["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(ValueError, match="imagePullPolice"):
        client.V1PodTemplateSpec.model_validate(template)

"""The kustomize base and overlay in k8s/: in step with the chart, valid, and applied as intended."""

from __future__ import annotations

import functools
import importlib.util
import json
from typing import Any

import pytest
import yaml

from deepspec.config import validate_config
from tests.k8s.validate import (
    KUSTOMIZE_DIR,
    REPO_ROOT,
    STAGE_LABEL,
    all_containers,
    helm_template,
    kustomize_build,
    pod_templates,
    validate_objects,
)

BASE = KUSTOMIZE_DIR / "base"
OVERLAY = KUSTOMIZE_DIR / "overlays" / "qwen3-8b"
MANAGED_BY = "app.kubernetes.io/managed-by"


@functools.cache
def _built(directory: str) -> str:
    return json.dumps(kustomize_build(KUSTOMIZE_DIR / directory))


def built(directory: str) -> list[dict[str, Any]]:
    return json.loads(_built(directory))


def by_kind_and_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


def summary(obj: dict[str, Any]) -> dict[str, Any]:
    """Return the parts that must agree between helm and kustomize: labels, images and commands."""
    labels = {key: value for key, value in obj["metadata"]["labels"].items() if key != MANAGED_BY}
    pods = []
    for template in pod_templates(obj):
        pod_labels = {key: value for key, value in template["metadata"]["labels"].items() if key != MANAGED_BY}
        containers = [(item["name"], item["image"], item["command"]) for item in all_containers(template["spec"])]
        pods.append({"labels": pod_labels, "containers": containers})
    return {"labels": labels, "pods": pods}


def test_base_in_step_with_chart() -> None:
    spec = importlib.util.spec_from_file_location("generate_base", REPO_ROOT / "k8s" / "generate_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = {path.name: path.read_text(encoding="utf-8") for path in BASE.glob("*.yaml")}
    assert current == module.base_files(), "k8s/base is out of date with the chart; run make generate"


@pytest.mark.parametrize("directory", ["base", "overlays/qwen3-8b"])
def test_kustomize_output_validates(directory: str) -> None:
    validate_objects(built(directory))


def test_base_matches_helm_default() -> None:
    from_helm = by_kind_and_name(helm_template(release="deepspec-pipeline", set_values=[]))
    from_helm = {key: obj for key, obj in from_helm.items() if obj["kind"] != "Pod"}
    from_kustomize = by_kind_and_name(built("base"))
    assert sorted(from_kustomize) == sorted(from_helm)
    for key, obj in from_kustomize.items():
        assert summary(obj) == summary(from_helm[key]), f"{key} differs between k8s/base and helm template"
        assert obj["metadata"]["labels"][MANAGED_BY] == "kustomize"


def test_overlay_sets_namespace() -> None:
    for obj in built("overlays/qwen3-8b"):
        assert obj["metadata"]["namespace"] == "deepspec", obj["metadata"]["name"]


def test_overlay_replaces_every_image() -> None:
    images = {
        item["image"]
        for obj in built("overlays/qwen3-8b")
        for template in pod_templates(obj)
        for item in all_containers(template["spec"])
    }
    assert images == {
        "registry.example.com/ml/deepspec-data:0.1.0",
        "registry.example.com/ml/deepspec-gpu:0.1.0",
        "registry.example.com/mirror/vllm-openai:v0.11.0",
    }


def test_overlay_patches_claim() -> None:
    (claim,) = [obj for obj in built("overlays/qwen3-8b") if obj["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "4Ti"
    assert claim["spec"]["storageClassName"] == "cephfs"


def test_overlay_config_is_valid_and_consistent() -> None:
    objects = built("overlays/qwen3-8b")
    (config_map,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    config = validate_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert config.target.name_or_path == "Qwen/Qwen3-8B"
    (base_map,) = [obj for obj in built("base") if obj["kind"] == "ConfigMap"]
    base = validate_config(yaml.safe_load(base_map["data"]["config.yaml"]))
    assert config.storage == base.storage
    assert config.regen.openai.endpoints == base.regen.openai.endpoints
    assert config_map["metadata"]["name"] == base_map["metadata"]["name"]


def test_overlay_keeps_stage_labels() -> None:
    stages = {obj["metadata"]["labels"].get(STAGE_LABEL) for obj in built("overlays/qwen3-8b")}
    assert {"prompts", "regen", "cache", "train", "eval"} <= stages

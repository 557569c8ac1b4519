"""Render Kubernetes manifests with the real helm and kubectl binaries, and validate them offline.

Built-in kinds go through kubernetes-validate's strict schemas for the oldest supported Kubernetes
release (a kind without a schema is a failure, not a warning). PyTorchJob goes through its CRD's
OpenAPI schema with ``additionalProperties: false`` added to every object that lists its properties,
which mimics the API server's strict field validation. Every pod template is also checked with the
kubernetes client's pydantic models, which forbid unknown fields and unquoted quantities.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes import client as k8s_client

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "deepspec-pipeline"
VALUES_DIR = Path(__file__).resolve().parent / "values"
KUSTOMIZE_DIR = REPO_ROOT / "k8s"
BIN_DIR = Path(sys.executable).parent
HELM = BIN_DIR / "helm"
KUBECTL = BIN_DIR / "kubectl"

MIN_KUBE_VERSION = "1.29.0"
PYTORCHJOB_CRD_ENV = "DEEPSPEC_PYTORCHJOB_CRD"
DEFAULT_PYTORCHJOB_CRD = REPO_ROOT.parent / "shared" / "k8s-schemas" / "kubeflow.org_pytorchjobs.yaml"

STAGES = ("prompts", "regen", "cache", "train", "eval")
# The stage whose output each stage's init container waits for.
WAITS_FOR = {"regen": "prompts", "cache": "regen", "train": "cache", "eval": "train"}
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
)
STAGE_LABEL = "deepspec.ai/stage"


def run_tool(command: list[str | Path]) -> subprocess.CompletedProcess[str]:
    """Run a helm or kubectl command; the binaries come with ``make install`` into the virtualenv."""
    binary = Path(command[0])
    if not binary.is_file():
        raise AssertionError(f"{binary} not found; run `make install` to install helm and kubectl into the venv")
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120, check=False)


def values_args(values_files: list[Path], set_values: list[str]) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["-f", str(path)]
    for assignment in set_values:
        args += ["--set", assignment]
    return args


def helm_template_result(
    values_files: list[Path] = (), set_values: list[str] = (), release: str = "ds", namespace: str = "ml"
) -> subprocess.CompletedProcess[str]:
    return run_tool(
        [HELM, "template", release, CHART_DIR, "--namespace", namespace, "--kube-version", MIN_KUBE_VERSION]
        + values_args(list(values_files), list(set_values))
    )


def helm_template(
    values_files: list[Path] = (), set_values: list[str] = (), release: str = "ds", namespace: str = "ml"
) -> list[dict[str, Any]]:
    """Return the objects that ``helm template`` renders; fail with helm's stderr when it fails."""
    result = helm_template_result(values_files, set_values, release, namespace)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return parse_documents(result.stdout)


def helm_lint(values_files: list[Path] = (), set_values: list[str] = ()) -> subprocess.CompletedProcess[str]:
    return run_tool(
        [HELM, "lint", "--strict", CHART_DIR, "--kube-version", MIN_KUBE_VERSION]
        + values_args(list(values_files), list(set_values))
    )


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    result = run_tool([KUBECTL, "kustomize", directory])
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return parse_documents(result.stdout)


def parse_documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


@functools.cache
def pytorchjob_schema() -> dict[str, Any]:
    """Return the PyTorchJob CRD's v1 schema with unknown fields forbidden."""
    path = Path(os.environ.get(PYTORCHJOB_CRD_ENV, DEFAULT_PYTORCHJOB_CRD))
    if not path.is_file():
        raise AssertionError(
            f"PyTorchJob CRD schema {path} not found; set {PYTORCHJOB_CRD_ENV} to the CRD file "
            "kubeflow.org_pytorchjobs.yaml from kubeflow/training-operator (release-1.9, manifests/base/crds)"
        )
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    versions = {version["name"]: version for version in crd["spec"]["versions"]}
    return forbid_unknown_fields(versions["v1"]["schema"]["openAPIV3Schema"])


def forbid_unknown_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``schema`` where every object with listed properties rejects other keys."""
    strict = copy.deepcopy(schema)
    _forbid_in_place(strict)
    return strict


def _forbid_in_place(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _forbid_in_place(item)
        return
    if not isinstance(node, dict):
        return
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for value in node.values():
        _forbid_in_place(value)


def validate_object(obj: dict[str, Any]) -> None:
    """Raise AssertionError naming the object and the first problem found."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") == "PyTorchJob":
        errors = sorted(
            jsonschema.Draft7Validator(pytorchjob_schema()).iter_errors(obj), key=lambda error: list(error.path)
        )
        assert not errors, f"{name} fails the PyTorchJob CRD schema: " + "; ".join(
            f"{'.'.join(map(str, error.path))}: {error.message}" for error in errors
        )
    else:
        try:
            kubernetes_validate.validate(obj, MIN_KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as error:
            raise AssertionError(f"{name}: no Kubernetes {MIN_KUBE_VERSION} schema for this kind: {error}") from error
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            message = f"{name} is invalid for Kubernetes {MIN_KUBE_VERSION} at {path}: {error.message}"
            raise AssertionError(message) from error
    for template in pod_templates(obj):
        # The pydantic models report every unknown field and unquoted quantity at once.
        k8s_client.V1PodTemplateSpec.model_validate(template)


def validate_objects(objects: list[dict[str, Any]]) -> None:
    assert objects, "nothing was rendered"
    for obj in objects:
        validate_object(obj)


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the pod templates of a Job or PyTorchJob, and a bare Pod's metadata and spec as one."""
    kind = obj.get("kind")
    if kind == "Job":
        return [obj["spec"]["template"]]
    if kind == "PyTorchJob":
        return [replica["template"] for replica in obj["spec"]["pytorchReplicaSpecs"].values()]
    if kind == "Pod":
        return [{"metadata": obj["metadata"], "spec": obj["spec"]}]
    return []


def all_containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec.get("containers", [])


def stage_of(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get(STAGE_LABEL)


def find(objects: list[dict[str, Any]], kind: str, stage: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind and stage_of(obj) == stage]

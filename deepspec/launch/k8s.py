"""Kubernetes pieces of a deepspec pod: names, labels, resources, volumes and the restricted security context.

Everything here returns plain dicts in the API's camelCase field names, ready to be part of a manifest.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchx.specs import BindMount, DeviceMount, Role, VolumeMount

from deepspec import __version__

CONTAINER_NAME = "pytorch"  # the Kubeflow training operator requires this name
MASTER_PORT_NAME = "pytorchjob-port"  # the operator sets MASTER_PORT from the port with this name
SHM_VOLUME = "dshm"
GPU_RESOURCE = "nvidia.com/gpu"
STAGE_LABEL = "deepspec.ai/stage"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
# A pod name is <job>-worker-<index> and must stay a 63-character DNS label.
MAX_JOB_NAME = 48
_SUFFIX_LENGTH = 6


@dataclass(frozen=True)
class PodOptions:
    """Pod settings that come from scheduler run options rather than from the AppDef."""

    service_account: str | None = None
    image_pull_secret: str | None = None
    priority_class: str | None = None
    run_as_user: int = 10001  # the deepspec user of the images in docker/


def dns_label(text: str, max_length: int = 63) -> str:
    """Return ``text`` as a DNS-1035 label: lowercase letters, digits and '-', starting with a letter."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)
    if not label or not label[0].isalpha():
        label = f"j-{label}".rstrip("-")
    return label[:max_length].rstrip("-")


def unique_job_name(app_name: str) -> str:
    """Return ``<app name>-<6 random characters>``, short enough for the operator's pod names."""
    base = dns_label(app_name, MAX_JOB_NAME - _SUFFIX_LENGTH - 1)
    suffix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(_SUFFIX_LENGTH))
    return f"{base}-{suffix}"


def label_value(text: str) -> str:
    """Return ``text`` as a valid label value (at most 63 characters, alphanumeric at both ends)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return value.strip("._-")


def deepspec_labels(job_name: str, stage: str) -> dict[str, str]:
    """Return the recommended ``app.kubernetes.io/*`` labels plus ``deepspec.ai/stage``."""
    return {
        "app.kubernetes.io/name": "deepspec",
        "app.kubernetes.io/instance": label_value(job_name),
        "app.kubernetes.io/component": label_value(stage),
        "app.kubernetes.io/part-of": "deepspec",
        "app.kubernetes.io/managed-by": "torchx",
        "app.kubernetes.io/version": label_value(__version__),
        STAGE_LABEL: label_value(stage),
    }


def container_resources(role: Role) -> dict[str, dict[str, str]]:
    """Return requests equal to limits, so that a GPU pod gets the Guaranteed QoS class."""
    resource = role.resource
    limits: dict[str, str] = {}
    if resource.cpu > 0:
        limits["cpu"] = f"{int(resource.cpu * 1000)}m"
    if resource.memMB > 0:
        limits["memory"] = f"{int(resource.memMB)}Mi"
    if resource.gpu > 0:
        limits[GPU_RESOURCE] = str(resource.gpu)
    for device, count in resource.devices.items():
        limits[device] = str(count)
    return {"limits": dict(limits), "requests": dict(limits)}


def _volumes(role: Role) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # PyTorch's DataLoader workers and NCCL use /dev/shm, which is 64 MiB by default in a container.
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    for index, mount in enumerate(role.mounts):
        name = f"mount-{index}"
        if isinstance(mount, VolumeMount):
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": mount.src}})
            mounts.append({"name": name, "mountPath": mount.dst_path, "readOnly": mount.read_only})
        elif isinstance(mount, BindMount):
            volumes.append({"name": name, "hostPath": {"path": mount.src_path}})
            mounts.append({"name": name, "mountPath": mount.dst_path, "readOnly": mount.read_only})
        elif isinstance(mount, DeviceMount):
            raise ValueError(
                f"mount {mount.src_path}: device mounts need a privileged pod, which the restricted security "
                "context forbids; request the device through its device plugin resource instead"
            )
        else:
            raise TypeError(f"unknown mount type {type(mount).__name__}")
    return volumes, mounts


def _ports(port_map: Mapping[str, int]) -> list[dict[str, Any]]:
    ports = []
    for name, port in port_map.items():
        # The rendezvous port doubles as the PyTorchJob master port, so MASTER_PORT points at it.
        port_name = MASTER_PORT_NAME if name == "c10d" else dns_label(name, 15)
        ports.append({"name": port_name, "containerPort": int(port)})
    return ports


def pod_template(role: Role, labels: Mapping[str, str], options: PodOptions) -> dict[str, Any]:
    """Return a PodTemplateSpec for one node of ``role``: container ``pytorch``, /dev/shm, non-root."""
    volumes, volume_mounts = _volumes(role)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": role.image,
        "command": [role.entrypoint, *role.args],
        "env": [{"name": name, "value": value} for name, value in role.env.items()],
        "resources": container_resources(role),
        "ports": _ports(role.port_map),
        "volumeMounts": volume_mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": options.run_as_user,
            "runAsGroup": options.run_as_user,
            "fsGroup": options.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    instance_type = role.resource.capabilities.get(INSTANCE_TYPE_LABEL)
    if instance_type:
        spec["nodeSelector"] = {INSTANCE_TYPE_LABEL: str(instance_type)}
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    if options.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": options.image_pull_secret}]
    if options.priority_class:
        spec["priorityClassName"] = options.priority_class
    # An injected Istio sidecar keeps running after the trainer exits, so the pod would never complete.
    metadata = {"labels": dict(labels), "annotations": {"sidecar.istio.io/inject": "false"}}
    return {"metadata": metadata, "spec": spec}

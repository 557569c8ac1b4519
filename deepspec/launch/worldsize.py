"""Check that WORLD_SIZE matches the launch shape before a stage joins a process group.

torchrun sets ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` (processes on this node) and
``GROUP_WORLD_SIZE`` (nodes) in every worker. A Kubeflow PyTorchJob sets
``WORLD_SIZE = replicas x nprocPerNode`` in the container together with
``PET_NNODES`` and ``PET_NPROC_PER_NODE``, which torchrun passes on to its
workers. When these disagree, the ranks wait for processes that never start
until the rendezvous times out, so the stage stops at once instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class WorldSizeError(ValueError):
    """WORLD_SIZE differs from the number of processes the launcher starts."""


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "")
    if text == "":
        return None
    try:
        value = int(text)
    except ValueError as error:
        raise WorldSizeError(f"environment variable {name}={text!r} must be an integer") from error
    if value < 1:
        raise WorldSizeError(f"environment variable {name}={text!r} must be at least 1")
    return value


def _declared_int(environ: Mapping[str, str], name: str) -> int | None:
    """Return a PET_* value when it is a plain integer; elastic ranges and ``auto`` carry no fixed count."""
    text = environ.get(name, "")
    return int(text) if text.isdigit() and int(text) > 0 else None


def check_world_size(environ: Mapping[str, str] | None = None) -> int:
    """Return WORLD_SIZE (1 when unset); raise WorldSizeError when it differs from nodes x processes per node."""
    env = os.environ if environ is None else environ
    world = _int_env(env, "WORLD_SIZE")
    if world is None:
        return 1
    local = _int_env(env, "LOCAL_WORLD_SIZE")
    group = _int_env(env, "GROUP_WORLD_SIZE")
    nnodes = _declared_int(env, "PET_NNODES")
    nproc = _declared_int(env, "PET_NPROC_PER_NODE")

    if local is not None and group is not None and world != group * local:
        raise WorldSizeError(
            f"WORLD_SIZE={world} but torchrun started GROUP_WORLD_SIZE={group} nodes x LOCAL_WORLD_SIZE={local} "
            f"processes = {group * local}; start every node with the same --nproc_per_node"
        )
    if local is None and nnodes is not None and world != nnodes:
        raise WorldSizeError(
            f"WORLD_SIZE={world} but this process was not started by torchrun (LOCAL_WORLD_SIZE is unset), so "
            f"the PET_NNODES={nnodes} nodes run one process each; start the stage with "
            f"`torchrun -m deepspec.cli <stage>` in the container command"
        )
    if local is not None and nnodes is not None and nproc is not None and world != nnodes * nproc:
        raise WorldSizeError(
            f"WORLD_SIZE={world} (torchrun, LOCAL_WORLD_SIZE={local} per node) but the job declares "
            f"PET_NNODES={nnodes} x PET_NPROC_PER_NODE={nproc} = {nnodes * nproc} processes (a PyTorchJob sets them "
            f"from replicas and spec.nprocPerNode); make torchrun's --nnodes/--nproc_per_node (TorchX -j NxG) match "
            f"the job, or set spec.nprocPerNode to the number of GPUs per node"
        )
    return world

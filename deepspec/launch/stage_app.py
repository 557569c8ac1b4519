"""Build the TorchX AppDef that runs one deepspec stage under torchrun.

The container command is ``bash -c "torchrun ... -m deepspec.cli <stage> --config <file> ..."``. On several
nodes the rendezvous endpoint is ``${<rank-0 host variable>:=localhost}:<port>``; each scheduler names that
variable through the ``rank0_env`` macro (``TORCHX_RANK0_HOST`` locally, ``MASTER_ADDR`` in a PyTorchJob).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence

from torchx import specs
from torchx.components.dist import parse_nnodes
from torchx.specs import macros
from torchx.specs.overlays import set_overlay

from deepspec import __version__

CLI_MODULE = "deepspec.cli"
# `make build push` tags images $(REGISTRY)/deepspec-gpu:$(TAG); pass --image, or set `image` in .torchxconfig.
DEFAULT_IMAGE = f"localhost:5000/deepspec-gpu:{__version__}"
CONFIG_ENV = "DEEPSPEC_CONFIG"
# AppDef metadata keys the pytorchjob scheduler reads.
STAGE_KEY = "deepspec.ai/stage"
NPROC_KEY = "deepspec.ai/nproc-per-node"
RDZV_PORT_NAME = "c10d"


class _Unquoted(str):
    """A shell word that must reach bash unquoted so that ``${VAR:=default}`` expands."""


def _join(words: Sequence[str]) -> str:
    return " ".join(word if isinstance(word, _Unquoted) else shlex.quote(word) for word in words)


def resolve_config(config: str | None, env: Mapping[str, str], stage: str) -> str | None:
    """Return the config path for the container: the argument, else DEEPSPEC_CONFIG of ``env`` or this shell."""
    if config:
        return config
    if env.get(CONFIG_ENV):
        # The container reads it from its environment; no --config needed.
        return None
    from_shell = os.environ.get(CONFIG_ENV)
    if from_shell:
        return from_shell
    raise ValueError(
        f"deepspec.{stage} needs a pipeline config: pass --config PATH (a path inside the container) "
        f"or set {CONFIG_ENV}"
    )


def torchrun_command(
    stage: str,
    nnodes: int,
    nproc_per_node: int,
    rdzv_port: int,
    config: str | None,
    stage_args: Sequence[str],
) -> list[str]:
    """Return the torchrun argv that starts ``nnodes x nproc_per_node`` processes of ``deepspec.cli <stage>``."""
    if nnodes == 1:
        # Port 0 lets the single agent pick a free port.
        endpoint = _Unquoted("localhost:0")
    else:
        endpoint = _Unquoted(f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}")
    command = [
        "torchrun",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        macros.app_id,
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc_per_node),
        "--role",
        stage,
        "--tee",
        "3",
        "-m",
        CLI_MODULE,
        stage,
    ]
    if config:
        command += ["--config", config]
    return command + list(stage_args)


def stage_app(
    stage: str,
    stage_args: Sequence[str],
    *,
    j: str,
    image: str,
    config: str | None,
    gpu: int,
    cpu: int,
    memMB: int,
    h: str | None,
    env: Mapping[str, str] | None,
    mounts: Sequence[str] | None,
    max_retries: int,
    rdzv_port: int,
    name: str | None,
) -> specs.AppDef:
    """Return an AppDef with one role of ``nnodes`` replicas, each running torchrun for ``stage``."""
    min_nnodes, nnodes, nproc_per_node, _ = parse_nnodes(j)
    if min_nnodes != nnodes:
        raise ValueError(f"-j {j}: elastic node ranges are not supported; use NxP, for example -j 2x8")
    if nproc_per_node < 1:
        raise ValueError(f"-j {j}: the number of processes per node must be at least 1")
    role_env = dict(env or {})
    config_path = resolve_config(config, role_env, stage)
    gpus = nproc_per_node if gpu < 0 else gpu
    role_env.setdefault("LOGLEVEL", "WARNING")
    command = torchrun_command(stage, nnodes, nproc_per_node, rdzv_port, config_path, stage_args)
    role = specs.Role(
        name=stage,
        image=image,
        entrypoint="bash",
        args=["-c", _join(command)],
        num_replicas=nnodes,
        resource=specs.resource(cpu=cpu, gpu=gpus, memMB=memMB, h=h),
        env=role_env,
        port_map={RDZV_PORT_NAME: rdzv_port},
        max_retries=max_retries,
        mounts=specs.parse_mounts(list(mounts)) if mounts else [],
    )
    # TorchX's kubernetes (Volcano) scheduler merges this into each pod, so `-l deepspec.ai/stage=<stage>` finds it.
    set_overlay(role, "kubernetes", "V1Pod", {"metadata": {"labels": {STAGE_KEY: stage}}})
    metadata = {STAGE_KEY: stage, NPROC_KEY: str(nproc_per_node)}
    return specs.AppDef(name=name or f"deepspec-{stage}", roles=[role], metadata=metadata)

"""Process-group setup from the standard torchrun environment (RANK is the global rank)."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepspec.launch.worldsize import check_world_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from error


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Join the process group when WORLD_SIZE > 1; pick gloo on CPU and nccl on GPU for ``auto``."""
    check_world_size()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size}); launch with torchrun")
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    chosen = None
    if world_size > 1:
        chosen = backend
        if backend == "auto":
            chosen = "nccl" if use_cuda else "gloo"
        if chosen == "nccl" and not use_cuda:
            raise ValueError("train.backend=nccl needs CUDA devices; use train.backend=gloo (or auto) on CPU")
        if not dist.is_initialized():
            dist.init_process_group(backend=chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
        logger.info("joined process group: backend=%s world_size=%d device=%s", chosen, world_size, device)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=chosen)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in a single process) and return it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

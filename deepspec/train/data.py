"""The assignment of cached samples to ranks and micro-batches at each optimizer step.

The sample stream is defined globally: epoch ``e`` is a permutation of the
cache seeded by ``train.seed + e``, truncated to whole global batches, and the
epochs are concatenated. Optimizer step ``s`` reads the ``s``-th global batch.
Rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of it and cuts them into
micro-batches. Because the stream depends only on the step, resuming needs no
sampler state, and the set of samples per step does not depend on ``W``.
"""

from __future__ import annotations

import torch

from deepspec.config import ConfigError


class StepSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        if num_samples < global_batch_size:
            raise ConfigError(
                f"the cache holds {num_samples} samples, fewer than train.global_batch_size={global_batch_size}; "
                "regenerate more records or lower train.global_batch_size"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch_size
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def global_batch(self, step: int) -> list[int]:
        """Sample indices of optimizer step ``step`` (0-indexed)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        assert self._order is not None
        start = offset * self.global_batch_size
        return self._order[start : start + self.global_batch_size].tolist()

    def rank_micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        mine = self.global_batch(step)[rank::world_size]
        return [mine[start : start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]

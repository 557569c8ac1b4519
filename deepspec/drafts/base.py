"""The interface between a draft and the speculative-decoding loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Proposal:
    """One round of drafted tokens.

    ``probs[i]`` is the distribution ``tokens[i]`` was sampled from (after any
    sequential-head correction and temperature), so rejection sampling against
    the target stays exact. At temperature 0 it is one-hot on the argmax.
    """

    tokens: torch.Tensor  # int64 [k]
    probs: torch.Tensor  # float32 [k, V]
    confidence_logits: torch.Tensor | None = None  # float32 [k], raw logits of the confidence head


class Drafter(Protocol):
    """A draft model bound to one sequence during speculative decoding.

    The loop calls ``reset`` once per prompt with the prompt's token ids, ``extend_context`` with the
    target features of every committed position (in order, without gaps), and
    ``propose`` with the last committed token, which sits at ``position``.
    """

    block_size: int

    def reset(self, prompt_ids: Sequence[int] = ()) -> None: ...

    def extend_context(self, features: torch.Tensor) -> None:
        """Append target features ``[n, L*H]`` for the next ``n`` committed positions."""
        ...

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal: ...

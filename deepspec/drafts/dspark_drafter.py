"""Drafting with a DSpark / DFlash model during speculative decoding (batch size 1).

The drafter keeps, per draft layer, the keys and values of the projected
target context only. Each proposal runs one block ``[anchor, MASK x (bs-1)]``
at positions ``position .. position+bs-1`` that attends to every cached
context row and bidirectionally to itself, without caching the block. Tokens
are then drawn left to right through the Markov head, so each slot's
distribution depends on the token drawn before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepspec.drafts.base import Proposal
from deepspec.drafts.dspark_backbone import DSparkModelBase

GREEDY_TEMPERATURE = 1e-5  # temperatures below this draw the argmax


@dataclass
class BlockSample:
    """One block drawn from the draft: tokens, the corrected logits and the distributions they were drawn from."""

    tokens: torch.Tensor  # int64 [bs]
    corrected_logits: torch.Tensor  # [bs, V], backbone logits plus the Markov bias along this path
    probs: torch.Tensor  # float32 [bs, V], softmax(corrected / T), one-hot at temperature 0
    confidence_logits: torch.Tensor | None  # float32 [bs]


def sample_block(
    model: DSparkModelBase,
    hidden: torch.Tensor,
    anchor_token: int,
    temperature: float,
    generator: torch.Generator | None = None,
    forced_tokens: torch.Tensor | None = None,
) -> BlockSample:
    """Draw the block's tokens left to right from its backbone outputs ``hidden [bs, H]``.

    Slot k's previous token is the anchor for k = 0, else the token drawn at
    k - 1. ``forced_tokens [bs]`` replaces the draws (teacher forcing a known
    path) while every distribution is still computed.
    """
    block_size = hidden.shape[0]
    base_logits = model.base_logits(hidden)
    head = model.markov_head
    prev = torch.tensor(anchor_token, dtype=torch.long, device=hidden.device)
    state = head.init_state((), hidden) if head is not None else None
    tokens, corrected_rows, prob_rows, prev_tokens = [], [], [], []
    for slot in range(block_size):
        logits = base_logits[slot]
        if head is not None:
            bias, state = head.step_bias(prev, hidden[slot], state)
            logits = logits + bias
        if temperature < GREEDY_TEMPERATURE:
            token = logits.argmax()
            probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            probs[token] = 1.0
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[0]
        if forced_tokens is not None:
            token = forced_tokens[slot].to(device=hidden.device, dtype=torch.long)
        prev_tokens.append(prev)
        tokens.append(token)
        corrected_rows.append(logits)
        prob_rows.append(probs)
        prev = token
    return BlockSample(
        tokens=torch.stack(tokens),
        corrected_logits=torch.stack(corrected_rows),
        probs=torch.stack(prob_rows),
        confidence_logits=model.confidence_logits(hidden, torch.stack(prev_tokens)),
    )


def proposal_length(confidence_logits: torch.Tensor | None, threshold: float, block_size: int) -> int:
    """Return how many leading tokens to propose: up to the first slot with ``sigmoid(logit) < threshold``.

    Each slot's confidence is conditional on the earlier slots being
    accepted, and the cut uses it directly, not the cumulative product.
    Without a confidence head or with threshold 0 the whole block is proposed.
    """
    if confidence_logits is None or threshold <= 0:
        return block_size
    below = (torch.sigmoid(confidence_logits) < threshold).nonzero()
    return int(below[0, 0]) if below.numel() else block_size


class DSparkDrafter:
    """A DSpark / DFlash draft bound to one sequence; see ``deepspec.drafts.base.Drafter``."""

    def __init__(self, model: DSparkModelBase) -> None:
        self.model = model
        self.block_size = model.config.block_size
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reset()

    @property
    def context_length(self) -> int:
        """Number of committed positions whose target features are cached."""
        return self._cache[0][0].shape[2] if self._cache else 0

    def reset(self, prompt_ids: Sequence[int] = ()) -> None:
        weight = self.model.fc.weight
        self._cache = []
        for layer in self.model.layers:
            attention = layer.self_attn
            empty = weight.new_zeros(1, attention.num_kv_heads, 0, attention.head_dim)
            self._cache.append((empty, empty))

    @torch.no_grad()
    def extend_context(self, features: torch.Tensor) -> None:
        """Append target features ``[n, L*H]`` for the next ``n`` committed positions."""
        if features.dim() != 2 or features.shape[1] != self.model.fc.in_features:
            raise ValueError(
                f"features must have shape [n, {self.model.fc.in_features}] "
                f"(n positions x target layers x hidden), got {tuple(features.shape)}"
            )
        if features.shape[0] == 0:
            return
        start = self.context_length
        device = self.model.fc.weight.device
        positions = torch.arange(start, start + features.shape[0], device=device)[None]
        context = self.model.context_features(features.to(device)[None])
        new_kv = self.model.context_kv(context, positions)
        self._cache = [
            (torch.cat([key, new_key], dim=2), torch.cat([value, new_value], dim=2))
            for (key, value), (new_key, new_value) in zip(self._cache, new_kv, strict=False)
        ]

    @torch.no_grad()
    def block_hidden(self, anchor_token: int, position: int) -> torch.Tensor:
        """Run the backbone over the block anchored at ``position``; return its outputs ``[bs, H]``."""
        if position != self.context_length:
            raise ValueError(
                f"the block anchored at position {position} needs the target features of positions "
                f"0..{position - 1}, but {self.context_length} are cached; call extend_context with "
                "the features of every committed position before the anchor"
            )
        device = self.model.fc.weight.device
        block_ids = torch.full((1, self.block_size), self.model.config.mask_token_id, device=device)
        block_ids[0, 0] = anchor_token
        positions = torch.arange(position, position + self.block_size, device=device)[None]
        return self.model.backbone(block_ids, positions, self._cache, mask=None)[0]

    @torch.no_grad()
    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        hidden = self.block_hidden(anchor_token, position)
        block = sample_block(self.model, hidden, anchor_token, temperature, generator)
        return Proposal(tokens=block.tokens, probs=block.probs, confidence_logits=block.confidence_logits)

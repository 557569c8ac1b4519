"""Sequential ("Markov") heads and the confidence head of a DSpark draft.

A sequential head adds a bias to the backbone logits of each block slot that
depends on the token before that slot (the anchor for slot 0, then the previous
draft token). All variants share ``markov_w1`` (Embedding(V, r)) and
``markov_w2`` (Linear(r -> V), no bias):

- vanilla: ``bias = W2 W1[prev]``, a rank-r factorisation of a first-order
  transition table that ignores the backbone state;
- gated: ``bias = W2 (sigmoid(gate_proj([h; W1[prev]])) * W1[prev])``;
- rnn: a recurrent state ``s`` (zero at the start of each block) with
  ``gate, cand, out = split(joint_proj([s; W1[prev]; h]))``,
  ``bias = W2 tanh(out)`` computed from the state *before* the update
  ``s <- sigmoid(gate) * s + (1 - sigmoid(gate)) * tanh(cand)``.

``h`` is the post-norm backbone output of the slot.
"""

from __future__ import annotations

import torch
from torch import nn

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Base class: the shared low-rank token tables and the slot-by-slot API."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def embed(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """Return ``W1[prev_ids]``, the previous-token features also fed to the confidence head."""
        return self.markov_w1(prev_ids)

    def init_state(self, batch_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """Return the recurrent state at the start of a block (None for stateless heads)."""
        return None

    def step_bias(
        self, prev_ids: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute one slot's bias ``[..., V]`` from ``prev_ids [...]`` and ``hidden [..., H]``.

        Returns the bias and the next recurrent state (None for stateless heads).
        """
        raise NotImplementedError

    def block_bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Compute the teacher-forced biases ``[..., bs, V]`` of whole blocks.

        ``prev_ids [..., bs]`` contains each slot's previous token and ``hidden
        [..., bs, H]`` the backbone outputs.
        """
        raise NotImplementedError


class VanillaMarkovHead(MarkovHead):
    def step_bias(
        self, prev_ids: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.markov_w2(self.markov_w1(prev_ids)), None

    def block_bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(self.markov_w1(prev_ids))


class GatedMarkovHead(MarkovHead):
    def __init__(self, vocab_size: int, hidden_size: int, rank: int) -> None:
        super().__init__(vocab_size, hidden_size, rank)
        self.gate_proj = nn.Linear(hidden_size + rank, rank, bias=True)

    def _bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        embedded = self.markov_w1(prev_ids)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, embedded], dim=-1)))
        return self.markov_w2(gate * embedded)

    def step_bias(
        self, prev_ids: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._bias(prev_ids, hidden), None

    def block_bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self._bias(prev_ids, hidden)


class RnnMarkovHead(MarkovHead):
    def __init__(self, vocab_size: int, hidden_size: int, rank: int) -> None:
        super().__init__(vocab_size, hidden_size, rank)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank, bias=True)

    def init_state(self, batch_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        return like.new_zeros(*batch_shape, self.rank)

    def step_bias(
        self, prev_ids: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if state is None:
            raise ValueError("the rnn Markov head needs the state from init_state() or the previous step")
        joint = self.joint_proj(torch.cat([state, self.markov_w1(prev_ids), hidden], dim=-1))
        gate_raw, cand_raw, out_raw = joint.split(self.rank, dim=-1)
        bias = self.markov_w2(torch.tanh(out_raw))
        gate = torch.sigmoid(gate_raw)
        next_state = gate * state + (1.0 - gate) * torch.tanh(cand_raw)
        return bias, next_state

    def block_bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        state = self.init_state(tuple(prev_ids.shape[:-1]), hidden)
        biases = []
        for slot in range(prev_ids.shape[-1]):
            bias, state = self.step_bias(prev_ids[..., slot], hidden[..., slot, :], state)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


_HEAD_CLASSES: dict[str, type[MarkovHead]] = {
    "vanilla": VanillaMarkovHead,
    "gated": GatedMarkovHead,
    "rnn": RnnMarkovHead,
}


def build_markov_head(head_type: str, *, vocab_size: int, hidden_size: int, rank: int) -> MarkovHead:
    """Build the sequential head named by ``markov_head_type``."""
    if head_type not in _HEAD_CLASSES:
        raise ValueError(f"markov_head_type {head_type!r} is not supported; use one of {', '.join(MARKOV_HEAD_TYPES)}")
    if rank <= 0:
        raise ValueError(f"markov_rank must be positive to build a Markov head, got {rank}")
    return _HEAD_CLASSES[head_type](vocab_size, hidden_size, rank)


class ConfidenceHead(nn.Module):
    """Predicts, per slot, the logit of "this draft token is accepted given all earlier ones were".

    The input is ``[h; W1[prev]]`` when ``with_markov`` (the Markov head's token
    table is shared, not copied), else ``h`` alone.
    """

    def __init__(self, hidden_size: int, markov_rank: int, with_markov: bool) -> None:
        super().__init__()
        self.with_markov = with_markov
        in_features = hidden_size + markov_rank if with_markov else hidden_size
        self.proj = nn.Linear(in_features, 1, bias=True)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor:
        """Return raw float32 logits ``[...]`` for ``hidden [..., H]``."""
        if self.with_markov:
            if prev_embedding is None:
                raise ValueError("this confidence head reads the Markov head's token features; pass prev_embedding")
            features = torch.cat([hidden, prev_embedding], dim=-1)
        else:
            features = hidden
        return self.proj(features).squeeze(-1).float()

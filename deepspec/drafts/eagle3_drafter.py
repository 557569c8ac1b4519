"""Drafting with an Eagle3 model during speculative decoding (batch size 1).

The draft keeps its own key/value cache of pairs ``(f_i, x_{i+1})`` at
position ``i``: the target features of every committed position ``i`` with the
token that follows it. A proposal anchored at ``position`` first adds the
pairs still missing (the last one pairs ``f_{position-1}`` with the anchor),
then drafts up to ``ttt_length`` tokens one at a time. Draft ``j`` (0-based)
is sampled from ``logits(h)`` and then run as the pair ``(h, d_j)`` at
position ``position + j``, where ``h`` is the draft's previous pre-norm
output. Those drafting entries are never stored: the next proposal starts
again from the committed pairs, so rejected drafts leave no trace.

``reset`` receives the prompt tokens; the interface passes no other tokens,
so the drafter reconstructs the other
committed tokens from its own proposals. When the next anchor sits at
``position``, the previous proposal's first ``position - previous - 1``
drafts were accepted.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from deepspec.drafts.base import Proposal
from deepspec.drafts.eagle3 import Eagle3Model
from deepspec.drafts.eagle3_layers import KeyValue

GREEDY_TEMPERATURE = 1e-5  # temperatures below this draw the argmax


def causal_extension_mask(cached: int, new: int, device: torch.device) -> torch.Tensor | None:
    """Return the bool mask ``[1, 1, new, cached + new]`` letting new slot ``q`` attend to keys ``<= cached + q``.

    Returns None for a single new slot, which may attend to every key.
    """
    if new <= 1:
        return None
    keys = torch.arange(cached + new, device=device)
    queries = torch.arange(new, device=device) + cached
    return (keys[None, :] <= queries[:, None])[None, None]


def sample_from_logits(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token from ``logits [V]``; return it and the float32 distribution it was drawn from.

    At temperature 0 the token is the argmax and the distribution is one-hot on it.
    """
    if temperature < GREEDY_TEMPERATURE:
        token = logits.argmax()
        probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        probs[token] = 1.0
        return token, probs
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0], probs


class Eagle3Drafter:
    """An Eagle3 draft bound to one sequence; see ``deepspec.drafts.base.Drafter``.

    ``end_token_ids`` (optional) end a proposal early: a drafted end token is
    proposed and nothing is drafted after it.
    """

    def __init__(
        self,
        model: Eagle3Model,
        prompt_ids: Sequence[int] | None = None,
        end_token_ids: Collection[int] = (),
    ) -> None:
        self.model = model
        self.block_size = model.ttt_length
        self.end_token_ids = frozenset(int(token) for token in end_token_ids)
        self._prompt = [int(token) for token in prompt_ids or []]
        self._tokens: list[int] = []
        self._features: list[torch.Tensor] = []
        self._num_features = 0
        self._cache: list[KeyValue] | None = None
        self._cached = 0
        self._last_hidden: torch.Tensor | None = None
        self._last_proposal: list[int] = []
        self._last_position: int | None = None
        self.reset()

    @property
    def context_length(self) -> int:
        """Number of committed positions whose target features were passed in."""
        return self._num_features

    def reset(self, prompt_ids: Sequence[int] | None = None) -> None:
        """Forget the committed context and the draft cache, and bind to ``prompt_ids`` (None keeps the prompt)."""
        if prompt_ids is not None:
            self._prompt = [int(token) for token in prompt_ids]
        self._tokens = list(self._prompt)
        self._features = []
        self._num_features = 0
        self._cache = None
        self._cached = 0
        self._last_hidden = None
        self._last_proposal = []
        self._last_position = None

    def extend_context(self, features: torch.Tensor) -> None:
        """Append target features ``[n, L*H]`` for the next ``n`` committed positions."""
        expected = self.model.fc.in_features
        if features.dim() != 2 or features.shape[1] != expected:
            raise ValueError(
                f"features must have shape [n, {expected}] (n positions x target layers x hidden), "
                f"got {tuple(features.shape)}"
            )
        if features.shape[0] == 0:
            return
        self._features.append(features.detach())
        self._num_features += features.shape[0]

    def _commit_tokens(self, anchor_token: int, position: int) -> None:
        """Record the accepted drafts of the previous proposal and the anchor as committed tokens."""
        if self._last_position is not None:
            accepted = position - self._last_position - 1
            if not 0 <= accepted <= len(self._last_proposal):
                raise ValueError(
                    f"anchor at position {position} does not follow the previous proposal at position "
                    f"{self._last_position} with {len(self._last_proposal)} drafts; call reset for a new sequence"
                )
            self._tokens.extend(self._last_proposal[:accepted])
        if len(self._tokens) != position:
            raise ValueError(
                f"the anchor sits at position {position}, but {len(self._tokens)} earlier tokens are known; "
                "call reset with the prompt token ids before decoding a new prompt"
            )
        self._tokens.append(int(anchor_token))

    def _extend_cache(self, position: int) -> None:
        """Run the pairs ``(f_i, x_{i+1})`` for ``i = cached .. position-1`` into the draft cache."""
        if self._num_features != position:
            raise ValueError(
                f"the proposal anchored at position {position} needs the target features of positions "
                f"0..{position - 1}, but {self._num_features} were passed; call extend_context with the "
                "features of every committed position before the anchor"
            )
        if position == self._cached:
            return
        device = self.model.fc.weight.device
        features = torch.cat(self._features, dim=0).to(device)
        self._features = []
        new = features.shape[0]
        tokens = torch.tensor(self._tokens[self._cached + 1 : position + 1], device=device)[None]
        positions = torch.arange(self._cached, position, device=device)[None]
        mask = causal_extension_mask(self._cached, new, device)
        hidden, self._cache = self.model.step(
            tokens, self.model.project_features(features[None]), positions, self._cache, mask
        )
        self._last_hidden = hidden[:, -1:]
        self._cached = position

    @torch.no_grad()
    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        self._commit_tokens(anchor_token, position)
        self._extend_cache(position)
        assert self._last_hidden is not None  # a non-empty prompt always leaves an output
        device = self.model.fc.weight.device
        hidden, cache = self._last_hidden, self._cache
        tokens: list[torch.Tensor] = []
        prob_rows: list[torch.Tensor] = []
        for offset in range(self.block_size):
            logits = self.model.compute_logits(hidden)[0, -1]
            token, probs = sample_from_logits(logits, temperature, generator)
            tokens.append(token)
            prob_rows.append(probs)
            if offset == self.block_size - 1 or int(token) in self.end_token_ids:
                break
            step_position = torch.tensor([[position + offset]], device=device)
            hidden, cache = self.model.step(token.view(1, 1), hidden, step_position, cache, None)
        proposal = Proposal(tokens=torch.stack(tokens).long(), probs=torch.stack(prob_rows))
        self._last_proposal = [int(token) for token in proposal.tokens]
        self._last_position = position
        return proposal

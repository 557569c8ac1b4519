"""Speculative decoding of one prompt: a draft proposes, the target verifies in one forward.

Sampling is lossless. At temperature T > 0 each drafted token d_i, sampled
from the draft distribution q_i, is accepted with probability
min(1, p_i(d_i) / q_i(d_i)), where p_i is the target distribution at the same
position. The first rejected position is resampled from the residual
normalise(max(0, p - q)), and when every draft is accepted a bonus token is
sampled from the target's last row, so every committed token follows the
target's own distribution. At T = 0 both sides use argmax and a draft is
accepted only when it equals the target's greedy token.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput

from deepspec.drafts.base import Drafter, Proposal

# Temperatures below this decode greedily (argmax on both sides).
GREEDY_TEMPERATURE = 1e-5
# Floor for q(d) in the acceptance ratio, and the residual mass below which the
# correction falls back to the target row itself.
PROBABILITY_EPS = 1e-8


@dataclass
class RoundRecord:
    """Counts of one draft-then-verify round: drafts proposed, drafts accepted, tokens committed.

    ``proposal_length`` is the effective number of drafts: the full proposal,
    or ``j`` when an end token at draft ``j`` ended the round. ``committed``
    counts the accepted drafts plus the correction or bonus token (``accepted + 1``),
    or ``j`` when an end token ended the round. ``accept_prefix[i]`` is True
    when drafts ``1..i+1`` were all accepted. ``confidence_logits`` are the
    draft's confidence-head logits for the effective proposal, when it has one.
    """

    proposal_length: int
    accepted: int
    committed: int
    stopped_by_end_token: bool
    accept_prefix: list[bool]
    confidence_logits: list[float] | None = None


@dataclass
class GenerationResult:
    """Tokens generated for one prompt and the rounds that produced them.

    ``tokens`` starts with the token sampled from the prefill (not part of any
    round) and stops after the first end token or at ``max_new_tokens``.
    """

    prompt_length: int
    tokens: list[int]
    rounds: list[RoundRecord] = field(default_factory=list)
    finish_reason: str = "max_new_tokens"  # or "end_token"


@dataclass(frozen=True)
class VerifyOutcome:
    """Result of verifying ``k`` drafts: accepted prefix length and the token that follows it."""

    accepted: int
    next_token: int
    accept_prefix: list[bool]


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_TEMPERATURE


def target_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return float32 ``softmax(logits / T)`` per row; at T = 0 only the argmax of the rows matters."""
    scale = 1.0 if is_greedy(temperature) else temperature
    return torch.softmax(logits.float() / scale, dim=-1)


def sample_token(probs: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Draw one token id from a probability row, or take its argmax at T = 0."""
    if is_greedy(temperature):
        return int(torch.argmax(probs).item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def residual_distribution(p_row: torch.Tensor, q_row: torch.Tensor) -> torch.Tensor:
    """Return ``normalise(max(0, p - q))``, or ``p`` itself when that residual has (almost) no mass."""
    residual = torch.clamp(p_row - q_row, min=0.0)
    mass = residual.sum()
    if mass.item() <= PROBABILITY_EPS:
        return p_row
    return residual / mass


def rejection_sample(
    p_rows: torch.Tensor,
    q_rows: torch.Tensor,
    draft_tokens: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
) -> VerifyOutcome:
    """Verify ``k`` drafted tokens against the target and pick the token that follows the accepted prefix.

    ``p_rows`` [k+1, V] are the target's distributions at the anchor and at
    each draft position, so row ``i`` predicts draft ``i+1``. ``q_rows`` [k, V]
    are the distributions the drafts were sampled from. One uniform draw is
    spent per draft, then one sample for the correction or bonus token.
    """
    k = int(draft_tokens.numel())
    if p_rows.shape[0] != k + 1:
        raise ValueError(f"rejection_sample needs k+1={k + 1} target rows for {k} drafts, got {p_rows.shape[0]}")
    if q_rows.shape[0] != k:
        raise ValueError(f"rejection_sample needs {k} draft rows for {k} drafts, got {q_rows.shape[0]}")
    drafts = draft_tokens.to(p_rows.device, torch.long)
    positions = torch.arange(k, device=p_rows.device)

    if is_greedy(temperature):
        accept = drafts == torch.argmax(p_rows[:k], dim=-1)
    else:
        q = q_rows.to(p_rows.device, torch.float32)
        p_draft = p_rows[positions, drafts]
        q_draft = q[positions, drafts].clamp_min(PROBABILITY_EPS)
        uniforms = torch.rand(k, generator=generator, device=p_rows.device)
        accept = uniforms < p_draft / q_draft

    prefix = torch.cumprod(accept.to(torch.int64), dim=0).bool() if k else accept
    accepted = int(prefix.sum().item())

    if accepted < k and not is_greedy(temperature):
        row = residual_distribution(p_rows[accepted], q_rows[accepted].to(p_rows.device, torch.float32))
    else:
        # All drafts accepted (or k = 0): the bonus token comes from the target row after the last draft.
        # At T = 0 the correction after a rejection is the target's argmax at that row as well.
        row = p_rows[accepted]
    next_token = sample_token(row, temperature, generator)
    return VerifyOutcome(accepted=accepted, next_token=next_token, accept_prefix=prefix.tolist())


def first_end_token(tokens: Sequence[int], end_token_ids: Collection[int]) -> int | None:
    """Return the 1-based index of the first end token in ``tokens``, or None."""
    for index, token in enumerate(tokens):
        if token in end_token_ids:
            return index + 1
    return None


def context_features(hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """Concatenate the chosen layers' outputs into draft features ``[S, len(layer_ids) * H]`` (batch 1).

    ``hidden_states`` is the tuple from ``output_hidden_states=True``: entry 0
    is the embedding output (layer id -1) and entry ``i + 1`` the output of
    decoder layer ``i``. The last decoder layer is rejected because that entry
    contains the final-normed state, not the raw layer output the draft was
    trained on.
    """
    num_layers = len(hidden_states) - 1
    for layer_id in layer_ids:
        if not -1 <= layer_id < num_layers - 1:
            raise ValueError(
                f"draft layer id {layer_id} is outside [-1, {num_layers - 2}] for a {num_layers}-layer target; "
                f"the last layer ({num_layers - 1}) cannot be used because its hidden state is final-normed"
            )
    return torch.cat([hidden_states[layer_id + 1][0] for layer_id in layer_ids], dim=-1)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop cached keys and values beyond the first ``length`` positions."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        # A negative count removes that many tokens; transformers 5.25 rejects a positive (absolute) length.
        cache.crop(-excess)


def _proposal_rows(proposal: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = proposal.tokens.reshape(-1).to(torch.long)
    probs = proposal.probs
    if probs.shape[0] != tokens.numel():
        raise ValueError(f"proposal has {tokens.numel()} tokens but {probs.shape[0]} probability rows")
    return tokens, probs


def _cache_argument(target: PreTrainedModel) -> str:
    # transformers 5.25 names the forward argument ``cache`` and deprecates ``past_key_values``;
    # earlier releases only know ``past_key_values`` and would silently ignore ``cache``.
    return "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"


def _target_forward(
    target: PreTrainedModel, input_ids: list[int], cache: DynamicCache, cache_argument: str, logits_to_keep: int = 0
) -> ModelOutput:
    ids = torch.tensor([input_ids], dtype=torch.long, device=target.device)
    return target(
        input_ids=ids,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=logits_to_keep,
        **{cache_argument: cache},
    )


def speculative_generate(
    target: PreTrainedModel,
    drafter: Drafter,
    prompt_ids: list[int],
    *,
    layer_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    end_token_ids: Collection[int],
    generator: torch.Generator | None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens for one prompt with speculative decoding (batch size 1).

    The first token is sampled from the target's prefill and belongs to no
    round. Each round then drafts a block from the last committed token,
    verifies it in one cached target forward, and commits the accepted drafts
    plus one correction or bonus token. An end token among the accepted
    drafts ends the round and the generation right after it.

    NOTE: the last round is recorded in full even when it commits past
    ``max_new_tokens``. Only the returned tokens are truncated, so round
    metrics measure the draft rather than the length limit.
    """
    if not prompt_ids:
        raise ValueError("speculative_generate needs a non-empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    end_tokens = frozenset(int(token) for token in end_token_ids)
    result = GenerationResult(prompt_length=len(prompt_ids), tokens=[])
    drafter.reset(prompt_ids)
    cache = DynamicCache(config=target.config)
    cache_argument = _cache_argument(target)

    with torch.inference_mode():
        prefill = _target_forward(target, list(prompt_ids), cache, cache_argument, logits_to_keep=1)
        first = sample_token(target_probs(prefill.logits[0, -1], temperature), temperature, generator)
        result.tokens.append(first)
        if first in end_tokens:
            result.finish_reason = "end_token"
            return result
        if max_new_tokens == 1:
            return result
        drafter.extend_context(context_features(prefill.hidden_states, layer_ids))
        del prefill

        # ``position`` is where the last committed token sits; it has no target features yet.
        position = len(prompt_ids)
        while len(result.tokens) < max_new_tokens:
            anchor = result.tokens[-1]
            proposal = drafter.propose(anchor, position, temperature, generator)
            drafts, q_rows = _proposal_rows(proposal)
            draft_list = drafts.tolist()
            verify = _target_forward(target, [anchor, *draft_list], cache, cache_argument)
            p_rows = target_probs(verify.logits[0], temperature)
            outcome = rejection_sample(p_rows, q_rows, drafts, temperature, generator)
            accepted = outcome.accepted

            cut = first_end_token(draft_list[:accepted], end_tokens)
            if cut is not None:
                result.tokens.extend(draft_list[:cut])
                result.rounds.append(_round_record(proposal, cut, cut, cut, True, [True] * cut))
                result.finish_reason = "end_token"
                break

            committed = [*draft_list[:accepted], outcome.next_token]
            result.tokens.extend(committed)
            result.rounds.append(
                _round_record(proposal, len(draft_list), accepted, len(committed), False, outcome.accept_prefix)
            )
            if outcome.next_token in end_tokens:
                result.finish_reason = "end_token"
                break
            if len(result.tokens) >= max_new_tokens:
                break
            # Keep the anchor and the accepted drafts; the new last token is verified next round.
            crop_cache(cache, position + accepted + 1)
            features = context_features(verify.hidden_states, layer_ids)
            drafter.extend_context(features[: accepted + 1])
            position += accepted + 1
            del verify

    if len(result.tokens) > max_new_tokens:
        result.tokens = result.tokens[:max_new_tokens]
        result.finish_reason = "end_token" if result.tokens[-1] in end_tokens else "max_new_tokens"
    return result


def _round_record(
    proposal: Proposal,
    proposal_length: int,
    accepted: int,
    committed: int,
    stopped_by_end_token: bool,
    accept_prefix: list[bool],
) -> RoundRecord:
    confidence = None
    if proposal.confidence_logits is not None:
        confidence = proposal.confidence_logits.reshape(-1)[:proposal_length].float().tolist()
    return RoundRecord(
        proposal_length=proposal_length,
        accepted=accepted,
        committed=committed,
        stopped_by_end_token=stopped_by_end_token,
        accept_prefix=list(accept_prefix),
        confidence_logits=confidence,
    )

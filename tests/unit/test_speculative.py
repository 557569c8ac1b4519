"""The speculative-decoding loop: rejection sampling math, end tokens, truncation and round records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from scipy import stats
from transformers import DynamicCache, Qwen3ForCausalLM

from deepspec.drafts.base import Proposal
from deepspec.eval.metrics import acceptance_sums
from deepspec.eval.speculative import (
    GenerationResult,
    context_features,
    crop_cache,
    first_end_token,
    rejection_sample,
    residual_distribution,
    speculative_generate,
)
from tests.unit.speculative_targets import HIDDEN, LAYER_IDS, VOCAB, build_target


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Rejection sampling without a model.


def test_empty_proposal_samples_bonus_from_first_row() -> None:
    p_rows = rows([0.0, 0.0, 1.0, 0.0])
    outcome = rejection_sample(p_rows, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 1.0, None)
    assert outcome.accepted == 0
    assert outcome.next_token == 2
    assert outcome.accept_prefix == []


def test_empty_proposal_greedy_takes_argmax() -> None:
    p_rows = rows([0.1, 0.6, 0.3, 0.0])
    outcome = rejection_sample(p_rows, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.0, None)
    assert outcome.accepted == 0
    assert outcome.next_token == 1


def test_all_accepted_samples_bonus_from_last_row() -> None:
    # p equals q at the drafted tokens, so the acceptance ratio is 1.
    p_rows = rows([0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0])
    q_rows = rows([0.5, 0.5, 0.0], [0.2, 0.8, 0.0])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        outcome = rejection_sample(p_rows, q_rows, torch.tensor([1, 0]), 1.0, generator)
        assert outcome.accepted == 2
        assert outcome.accept_prefix == [True, True]
        assert outcome.next_token == 2


def test_rejected_draft_resamples_from_residual() -> None:
    # The target gives the draft 0 no mass, so it is always rejected. The residual
    # max(0, p - q) = [0, 0, 0.5] leaves only token 2, although p also likes token 1.
    p_rows = rows([0.0, 0.5, 0.5], [1.0, 0.0, 0.0])
    q_rows = rows([0.5, 0.5, 0.0])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        outcome = rejection_sample(p_rows, q_rows, torch.tensor([0]), 1.0, generator)
        assert outcome.accepted == 0
        assert outcome.accept_prefix == [False]
        assert outcome.next_token == 2


def test_rejection_stops_the_accepted_prefix() -> None:
    # Draft 1 is certain to pass, draft 2 certain to fail, draft 3 would pass but comes after a rejection.
    p_rows = rows([0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    q_rows = rows([0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    outcome = rejection_sample(p_rows, q_rows, torch.tensor([1, 0, 0]), 1.0, torch.Generator().manual_seed(0))
    assert outcome.accepted == 1
    assert outcome.accept_prefix == [True, False, False]
    assert outcome.next_token == 2


def test_residual_without_mass_falls_back_to_target() -> None:
    p_row = torch.tensor([0.25, 0.25, 0.5])
    assert torch.equal(residual_distribution(p_row, p_row.clone()), p_row)
    nearly_equal = p_row + torch.tensor([1e-10, 1e-10, -2e-10])
    assert torch.equal(residual_distribution(p_row, nearly_equal), p_row)


def test_residual_is_normalised_positive_part() -> None:
    residual = residual_distribution(torch.tensor([0.1, 0.6, 0.3]), torch.tensor([0.5, 0.2, 0.3]))
    assert torch.allclose(residual, torch.tensor([0.0, 1.0, 0.0]))


def test_greedy_accepts_only_argmax_matches() -> None:
    p_rows = rows([0.1, 0.9, 0.0], [0.7, 0.2, 0.1], [0.0, 0.3, 0.7])
    one_hot = rows([0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
    outcome = rejection_sample(p_rows, one_hot, torch.tensor([1, 1]), 0.0, None)
    assert outcome.accepted == 1
    assert outcome.accept_prefix == [True, False]
    assert outcome.next_token == 0


def test_row_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="k\\+1=3 target rows"):
        rejection_sample(rows([1.0, 0.0]), rows([1.0, 0.0], [1.0, 0.0]), torch.tensor([0, 0]), 1.0, None)
    with pytest.raises(ValueError, match="2 draft rows"):
        rejection_sample(rows([1.0, 0.0], [1.0, 0.0], [1.0, 0.0]), rows([1.0, 0.0]), torch.tensor([0, 0]), 1.0, None)


def test_first_committed_token_follows_target() -> None:
    """The token after one verify step (draft if accepted, else correction) is distributed as p."""
    p_row = torch.tensor([0.1, 0.4, 0.3, 0.2])
    q_row = torch.tensor([0.6, 0.1, 0.1, 0.2])
    p_rows = torch.stack([p_row, torch.full((4,), 0.25)])
    generator = torch.Generator().manual_seed(0)
    counts: Counter[int] = Counter()
    rejected = 0
    draws = 20000
    for _ in range(draws):
        draft = torch.multinomial(q_row, 1, generator=generator)
        outcome = rejection_sample(p_rows, q_row[None], draft, 1.0, generator)
        counts[int(draft.item()) if outcome.accepted else outcome.next_token] += 1
        rejected += outcome.accepted == 0
    observed = [counts[token] for token in range(4)]
    assert stats.chisquare(observed, (p_row * draws).tolist()).pvalue > 0.01
    # Acceptance probability is sum(min(p, q)) = 0.5 for these rows.
    assert abs(rejected / draws - 0.5) < 0.02


# Helpers of the loop.


def test_first_end_token_is_one_based() -> None:
    assert first_end_token([4, 5, 9, 9], {9}) == 3
    assert first_end_token([4, 5], {9}) is None
    assert first_end_token([], {9}) is None


def test_context_features_concatenate_chosen_layers() -> None:
    hidden_states = tuple(torch.full((1, 5, 2), float(index)) for index in range(4))  # embeddings + 3 layers
    features = context_features(hidden_states, [-1, 1])
    assert features.shape == (5, 4)
    assert features[0].tolist() == [0.0, 0.0, 2.0, 2.0]


def test_context_features_reject_last_layer() -> None:
    hidden_states = tuple(torch.zeros(1, 5, 2) for _ in range(4))
    with pytest.raises(ValueError, match="last layer \\(2\\)"):
        context_features(hidden_states, [0, 2])


# The loop on a tiny random target with scripted drafts.


class ScriptedDrafter:
    """Proposes a fixed list of tokens per round (one-hot probabilities) and records the loop's calls."""

    def __init__(self, script: list[list[int]], block_size: int = 5) -> None:
        self.script = script
        self.block_size = block_size
        self.context_sizes: list[int] = []
        self.anchors: list[tuple[int, int]] = []

    def reset(self, prompt_ids=()) -> None:
        self.context_sizes = []
        self.anchors = []

    def extend_context(self, features: torch.Tensor) -> None:
        assert features.shape[1] == len(LAYER_IDS) * HIDDEN
        self.context_sizes.append(features.shape[0])

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        assert position == sum(self.context_sizes)
        tokens = self.script[len(self.anchors)]
        self.anchors.append((anchor_token, position))
        probs = torch.zeros(len(tokens), VOCAB)
        probs[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 1.0
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), probs=probs)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target() -> Qwen3ForCausalLM:
    return build_target()


@pytest.fixture(scope="module")
def greedy_case(target: Qwen3ForCausalLM) -> tuple[list[int], list[int]]:
    """Return a prompt whose first 7 greedy tokens are distinct, and its 12-token greedy continuation."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(200):
        prompt = torch.randint(0, VOCAB, (1, 6), generator=generator)
        output = target.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
        greedy = output[0, 6:].tolist()
        if len(set(greedy[:7])) == 7:
            return prompt[0].tolist(), greedy
    raise AssertionError("no prompt with 7 distinct greedy tokens; change the target seed")


def decode(
    target: Qwen3ForCausalLM, drafter: ScriptedDrafter, prompt: list[int], max_new_tokens: int, end: list[int]
) -> GenerationResult:
    return speculative_generate(
        target,
        drafter,
        prompt,
        layer_ids=LAYER_IDS,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        end_token_ids=end,
        generator=None,
    )


def test_end_token_in_accepted_drafts_ends_round(
    target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]
) -> None:
    """Round 2 drafts 5 correct tokens with the end token third: 3 are committed, not 6, and tau is 3."""
    prompt, g = greedy_case
    wrong = (g[3] + 1) % VOCAB
    drafter = ScriptedDrafter([[g[1], g[2], wrong, g[4], g[5]], [g[4], g[5], g[6], g[7], g[8]]])
    result = decode(target, drafter, prompt, max_new_tokens=12, end=[g[6]])

    assert result.tokens == g[:7]
    assert result.finish_reason == "end_token"
    assert [record.committed for record in result.rounds] == [3, 3]
    first, second = result.rounds
    assert (first.proposal_length, first.accepted, first.stopped_by_end_token) == (5, 2, False)
    assert first.accept_prefix == [True, True, False, False, False]
    assert (second.proposal_length, second.accepted, second.stopped_by_end_token) == (3, 3, True)
    assert second.accept_prefix == [True, True, True]
    assert acceptance_sums([result]).tau == 3.0
    # The drafter got the prompt features, then the anchor and 2 accepted drafts; round 2 starts at the correction.
    assert drafter.context_sizes == [len(prompt), 3]
    assert drafter.anchors == [(g[0], len(prompt)), (g[3], len(prompt) + 3)]


def test_end_token_as_correction_stops(target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]) -> None:
    prompt, g = greedy_case
    wrong = (g[3] + 1) % VOCAB
    drafter = ScriptedDrafter([[g[1], g[2], wrong], [g[4]]])
    result = decode(target, drafter, prompt, max_new_tokens=12, end=[g[3]])
    assert result.tokens == g[:4]
    assert result.finish_reason == "end_token"
    assert len(result.rounds) == 1
    assert result.rounds[0].committed == 3
    assert not result.rounds[0].stopped_by_end_token


def test_end_token_first_gives_zero_rounds(target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]) -> None:
    prompt, g = greedy_case
    drafter = ScriptedDrafter([])
    result = decode(target, drafter, prompt, max_new_tokens=12, end=[g[0]])
    assert result.tokens == [g[0]]
    assert result.rounds == []
    assert result.finish_reason == "end_token"
    assert drafter.context_sizes == []


def test_one_new_token_needs_no_round(target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]) -> None:
    prompt, g = greedy_case
    result = decode(target, ScriptedDrafter([]), prompt, max_new_tokens=1, end=[])
    assert result.tokens == [g[0]]
    assert result.rounds == []
    assert result.finish_reason == "max_new_tokens"


def test_last_round_is_recorded_in_full(target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]) -> None:
    """Tokens stop at max_new_tokens, while the round keeps every token it committed."""
    prompt, g = greedy_case
    drafter = ScriptedDrafter([g[1:6]])
    result = decode(target, drafter, prompt, max_new_tokens=4, end=[])
    assert result.tokens == g[:4]
    assert result.finish_reason == "max_new_tokens"
    assert len(result.rounds) == 1
    assert result.rounds[0].committed == 6


def test_empty_proposals_still_advance(target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]) -> None:
    prompt, g = greedy_case
    drafter = ScriptedDrafter([[], [], []])
    result = decode(target, drafter, prompt, max_new_tokens=4, end=[])
    assert result.tokens == g[:4]
    assert [record.committed for record in result.rounds] == [1, 1, 1]
    assert drafter.context_sizes == [len(prompt), 1, 1]


def test_confidence_logits_cut_to_effective_proposal(
    target: Qwen3ForCausalLM, greedy_case: tuple[list[int], list[int]]
) -> None:
    prompt, g = greedy_case

    class ConfidentDrafter(ScriptedDrafter):
        def propose(
            self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
        ) -> Proposal:
            proposal = super().propose(anchor_token, position, temperature, generator)
            proposal.confidence_logits = torch.arange(len(proposal.tokens), dtype=torch.float32)
            return proposal

    drafter = ConfidentDrafter([[g[1], g[2], g[3], g[4]]])
    result = decode(target, drafter, prompt, max_new_tokens=12, end=[g[3]])
    assert result.rounds[0].proposal_length == 3
    assert result.rounds[0].confidence_logits == [0.0, 1.0, 2.0]


def test_crop_cache_keeps_prefix(target: Qwen3ForCausalLM) -> None:
    cache = DynamicCache(config=target.config)
    with torch.no_grad():
        target(input_ids=torch.arange(10)[None], cache=cache, use_cache=True)
    crop_cache(cache, 6)
    assert cache.get_seq_length() == 6
    crop_cache(cache, 8)
    assert cache.get_seq_length() == 6

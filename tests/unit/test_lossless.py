"""Speculative decoding reproduces the target: token for token at T=0, in distribution at T=1.

The target is a 2-layer random Qwen3 with a small vocabulary and a scaled-up
LM head, so its next-token distributions are peaked and depend on context.
The drafts are deliberately weak, so rejections and residual sampling happen
often.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
from scipy import stats
from transformers import Qwen3ForCausalLM

import deepspec.eval.speculative as speculative
from deepspec.drafts.base import Proposal
from deepspec.eval.metrics import acceptance_sums
from deepspec.eval.speculative import GREEDY_TEMPERATURE, speculative_generate
from tests.unit.speculative_targets import HIDDEN, LAYER_IDS, VOCAB, build_target

FEATURE_WIDTH = len(LAYER_IDS) * HIDDEN
# Significance level of the distribution tests: the loop must pass at this level and a broken loop must fail.
ALPHA = 0.01


def one_hot(token: int) -> torch.Tensor:
    row = torch.zeros(VOCAB)
    row[token] = 1.0
    return row


class TableDrafter:
    """Drafts a chain from a fixed next-token table ``softmax(logits[previous token] / T)``.

    It ignores the target features but checks that the loop hands them over
    for every committed position before the anchor.
    """

    def __init__(self, logits: torch.Tensor, block_size: int) -> None:
        self.logits = logits
        self.block_size = block_size
        self.context_length = 0

    def reset(self, prompt_ids=()) -> None:
        self.context_length = 0

    def extend_context(self, features: torch.Tensor) -> None:
        assert features.shape[1] == FEATURE_WIDTH
        self.context_length += features.shape[0]

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        assert position == self.context_length
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        previous = anchor_token
        for _ in range(self.block_size):
            if temperature < GREEDY_TEMPERATURE:
                token = int(torch.argmax(self.logits[previous]).item())
                row = one_hot(token)
            else:
                row = torch.softmax(self.logits[previous] / temperature, dim=-1)
                token = int(torch.multinomial(row, 1, generator=generator).item())
            tokens.append(token)
            rows.append(row)
            previous = token
        probs = torch.stack(rows) if rows else torch.zeros(0, VOCAB)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), probs=probs)


class SequenceDrafter:
    """Proposes the next tokens of a known sequence: a perfect greedy draft when it is the target's output."""

    def __init__(self, sequence: list[int], block_size: int) -> None:
        self.sequence = sequence
        self.block_size = block_size
        self.context_length = 0

    def reset(self, prompt_ids=()) -> None:
        self.context_length = 0

    def extend_context(self, features: torch.Tensor) -> None:
        self.context_length += features.shape[0]

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        assert position == self.context_length
        assert self.sequence[position] == anchor_token
        tokens = self.sequence[position + 1 : position + 1 + self.block_size]
        probs = torch.stack([one_hot(token) for token in tokens]) if tokens else torch.zeros(0, VOCAB)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), probs=probs)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Decode with one thread: batch-1 steps of a tiny model only lose time to thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target() -> Qwen3ForCausalLM:
    return build_target()


@torch.no_grad()
def weak_table(target: Qwen3ForCausalLM, seed: int = 5) -> torch.Tensor:
    """Next-token logits that mix the target's one-token-context prediction with fixed noise."""
    single = torch.softmax(target(torch.arange(VOCAB)[:, None]).logits[:, -1].double(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.softmax(2.0 * torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64), dim=-1)
    return (0.5 * single + 0.5 * noise).log().float()


def greedy_reference(target: Qwen3ForCausalLM, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    ids = torch.tensor([prompt])
    output = target.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


def prompts(count: int, length: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (length,), generator=generator).tolist() for _ in range(count)]


def test_greedy_perfect_drafter_matches_generate(target: Qwen3ForCausalLM) -> None:
    for prompt in prompts(3):
        reference = greedy_reference(target, prompt, 20, eos=None)
        drafter = SequenceDrafter(prompt + reference, block_size=4)
        result = speculative_generate(
            target,
            drafter,
            prompt,
            layer_ids=LAYER_IDS,
            max_new_tokens=20,
            temperature=0.0,
            end_token_ids=[],
            generator=None,
        )
        assert result.tokens == reference
        assert all(record.accepted == record.proposal_length for record in result.rounds)
        assert acceptance_sums([result]).tau > 4.0


def test_greedy_weak_drafter_matches_generate(target: Qwen3ForCausalLM) -> None:
    drafter = TableDrafter(weak_table(target), block_size=3)
    results = []
    for prompt in prompts(4):
        reference = greedy_reference(target, prompt, 20, eos=None)
        result = speculative_generate(
            target,
            drafter,
            prompt,
            layer_ids=LAYER_IDS,
            max_new_tokens=20,
            temperature=0.0,
            end_token_ids=[],
            generator=None,
        )
        assert result.tokens == reference
        results.append(result)
    accepted = [record.accepted for result in results for record in result.rounds]
    assert min(accepted) == 0
    assert max(accepted) >= 1


def test_greedy_stops_at_end_token_like_generate(target: Qwen3ForCausalLM) -> None:
    drafter = TableDrafter(weak_table(target), block_size=3)
    for prompt in prompts(3):
        free_run = greedy_reference(target, prompt, 20, eos=None)
        eos = free_run[7]
        reference = greedy_reference(target, prompt, 20, eos=eos)
        result = speculative_generate(
            target,
            drafter,
            prompt,
            layer_ids=LAYER_IDS,
            max_new_tokens=20,
            temperature=0.0,
            end_token_ids=[eos],
            generator=None,
        )
        assert result.tokens == reference
        assert result.tokens[-1] == eos
        assert result.finish_reason == "end_token"


# Distribution test at T=1 over the joint outcome of the first three generated tokens.

SAMPLE_PROMPT = [3, 7, 11, 5]
SAMPLE_TOKENS = 3
# The noisy draft's distribution: ORACLE_SHARE of the target's exact distribution raised to the power
# SHARPEN and renormalised (an overconfident draft), the rest fixed noise.
ORACLE_SHARE = 0.7
SHARPEN = 5.0


@pytest.fixture(scope="module")
def exact_conditionals(target: Qwen3ForCausalLM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the target's next-token distributions after the sample prompt: [V], [V, V] and [V, V, V]."""
    prompt = SAMPLE_PROMPT
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double(), dim=-1)
        pairs = torch.tensor([prompt + [a] for a in range(VOCAB)])
        second = torch.softmax(target(pairs).logits[:, -1].double(), dim=-1)
        triples = torch.tensor([prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
        third = torch.softmax(target(triples).logits[:, -1].double(), dim=-1).view(VOCAB, VOCAB, VOCAB)
    return first, second, third


@pytest.fixture(scope="module")
def exact_joint(exact_conditionals: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Return the target's probability of every 3-token continuation of the sample prompt, [V, V, V]."""
    first, second, third = exact_conditionals
    return first[:, None, None] * second[:, :, None] * third


def mix_with_noise(exact: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    sharpened = exact**SHARPEN
    return ORACLE_SHARE * sharpened / sharpened.sum() + (1 - ORACLE_SHARE) * noise


class NoisyOracleDrafter:
    """Drafts from an overconfident copy of the target's exact distribution mixed with fixed noise.

    The exact distributions are known for the 2nd and 3rd generated tokens
    after the sample prompt; later drafts come from the noise alone. It
    rebuilds the committed sequence from the anchors and its own accepted
    drafts, so it also checks that the loop reports committed positions in
    order. It proposes 0..block_size tokens, the length drawn from the
    generator, so empty proposals, bonus tokens and rejections at either
    draft position all occur.
    """

    def __init__(
        self, conditionals: tuple[torch.Tensor, torch.Tensor, torch.Tensor], noise: torch.Tensor, block_size: int
    ) -> None:
        _, self.second, self.third = conditionals
        self.noise = noise
        self.block_size = block_size
        self.sequence: list[int] = []
        self.pending: list[int] = []

    def reset(self, prompt_ids=()) -> None:
        self.sequence = []
        self.pending = list(SAMPLE_PROMPT)

    def extend_context(self, features: torch.Tensor) -> None:
        count = features.shape[0]
        assert count <= len(self.pending)
        self.sequence.extend(self.pending[:count])
        self.pending = []

    def draft_row(self, generated: list[int]) -> torch.Tensor:
        row = self.noise[generated[-1]]
        if len(generated) == 1:
            row = mix_with_noise(self.second[generated[0]], row)
        elif len(generated) == 2:
            row = mix_with_noise(self.third[generated[0], generated[1]], row)
        return row.float()

    def propose(
        self, anchor_token: int, position: int, temperature: float, generator: torch.Generator | None
    ) -> Proposal:
        assert temperature == 1.0
        assert position == len(self.sequence)
        length = int(torch.randint(0, self.block_size + 1, (1,), generator=generator).item())
        generated = self.sequence[len(SAMPLE_PROMPT) :] + [anchor_token]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(length):
            row = self.draft_row(generated)
            token = int(torch.multinomial(row, 1, generator=generator).item())
            tokens.append(token)
            rows.append(row)
            generated.append(token)
        self.pending = [anchor_token, *tokens]
        probs = torch.stack(rows) if rows else torch.zeros(0, VOCAB)
        return Proposal(tokens=torch.tensor(tokens, dtype=torch.long), probs=probs)


def noisy_drafter(conditionals: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> NoisyOracleDrafter:
    generator = torch.Generator().manual_seed(5)
    noise = torch.softmax(2.0 * torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64), dim=-1)
    return NoisyOracleDrafter(conditionals, noise, block_size=2)


def sample_outcomes(
    target: Qwen3ForCausalLM, drafter: NoisyOracleDrafter, runs: int, seed: int
) -> tuple[Counter[tuple[int, ...]], int, int]:
    """Decode the sample prompt ``runs`` times; return outcome counts, drafts proposed and drafts accepted."""
    generator = torch.Generator().manual_seed(seed)
    counts: Counter[tuple[int, ...]] = Counter()
    proposed = accepted = 0
    for _ in range(runs):
        result = speculative_generate(
            target,
            drafter,
            SAMPLE_PROMPT,
            layer_ids=LAYER_IDS,
            max_new_tokens=SAMPLE_TOKENS,
            temperature=1.0,
            end_token_ids=[],
            generator=generator,
        )
        assert len(result.tokens) == SAMPLE_TOKENS
        counts[tuple(result.tokens)] += 1
        proposed += sum(record.proposal_length for record in result.rounds)
        accepted += sum(record.accepted for record in result.rounds)
    return counts, proposed, accepted


def chi_square_pvalue(counts: Counter[tuple[int, ...]], joint: torch.Tensor, runs: int) -> float:
    """Chi-square goodness of fit: outcomes expected at least 5 times get a bin, the rest share one."""
    expected = joint.flatten() * runs
    observed_bins: list[float] = []
    expected_bins: list[float] = []
    for index in torch.argsort(expected, descending=True).tolist():
        if expected[index] < 5:
            break
        outcome = (index // (VOCAB * VOCAB), (index // VOCAB) % VOCAB, index % VOCAB)
        observed_bins.append(counts.get(outcome, 0))
        expected_bins.append(float(expected[index]))
    observed_bins.append(runs - sum(observed_bins))
    expected_bins.append(runs - sum(expected_bins))
    assert len(observed_bins) >= 20, "too few bins for a meaningful test"
    return float(stats.chisquare(observed_bins, expected_bins).pvalue)


def test_sampling_matches_target_distribution(
    target: Qwen3ForCausalLM, exact_conditionals: tuple[torch.Tensor, ...], exact_joint: torch.Tensor
) -> None:
    runs = 3000
    counts, proposed, accepted = sample_outcomes(target, noisy_drafter(exact_conditionals), runs, seed=0)
    rejection_rate = 1.0 - accepted / proposed
    assert rejection_rate > 0.3
    assert accepted / proposed > 0.2
    assert chi_square_pvalue(counts, exact_joint, runs) > ALPHA


@pytest.mark.parametrize(
    "broken_residual",
    [
        pytest.param(lambda p_row, q_row: p_row, id="target-row-without-subtracting-draft"),
        pytest.param(lambda p_row, q_row: q_row, id="draft-row"),
    ],
)
def test_broken_residual_fails_distribution_test(
    target: Qwen3ForCausalLM,
    exact_conditionals: tuple[torch.Tensor, ...],
    exact_joint: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
    broken_residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """The same test detects a loop that resamples rejected positions from the wrong distribution."""
    monkeypatch.setattr(speculative, "residual_distribution", broken_residual)
    runs = 1000
    counts, _, _ = sample_outcomes(target, noisy_drafter(exact_conditionals), runs, seed=0)
    assert chi_square_pvalue(counts, exact_joint, runs) < ALPHA

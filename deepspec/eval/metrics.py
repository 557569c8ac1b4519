"""Acceptance metrics of speculative decoding, pooled over all rounds of all prompts.

The sums are plain counts, so results from several prompts, benchmarks or
ranks combine by adding them (``AcceptanceSums.merge``) before the ratios are
taken. Two per-position acceptance rates are reported because they are easy
to confuse:

- ``survival@k`` = #rounds with accepted > k / #rounds with proposal > k, the
  chance that drafts 1..k+1 all survive (DeepSpec's eval table prints this);
- ``conditional@k`` = #rounds with accepted > k / #rounds with accepted >= k
  and proposal > k, the chance that draft k+1 is accepted given that drafts
  1..k were (the per-position acceptance curve of the DSpark paper).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deepspec.eval.speculative import GenerationResult, RoundRecord


def _add_at(counts: list[int], index: int, amount: int = 1) -> None:
    if index >= len(counts):
        counts.extend([0] * (index + 1 - len(counts)))
    counts[index] += amount


def _add_lists(left: list[int], right: list[int]) -> list[int]:
    total = [0] * max(len(left), len(right))
    for index, value in enumerate(left):
        total[index] += value
    for index, value in enumerate(right):
        total[index] += value
    return total


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class AcceptanceSums:
    """Mergeable counts behind every acceptance metric.

    Index ``k`` of the per-position lists is draft position ``k+1``:
    ``survived[k]`` counts rounds with accepted > k, ``proposed[k]`` rounds
    with proposal > k, and ``reached[k]`` rounds with accepted >= k and
    proposal > k. ``committed_histogram[c]`` counts rounds that committed
    ``c`` tokens.
    """

    prompts: int = 0
    rounds: int = 0
    generated_tokens: int = 0
    committed_tokens: int = 0
    accepted_drafts: int = 0
    proposed_drafts: int = 0
    end_token_rounds: int = 0
    committed_histogram: list[int] = field(default_factory=list)
    survived: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)

    def add_round(self, record: RoundRecord) -> None:
        self.rounds += 1
        self.committed_tokens += record.committed
        self.accepted_drafts += record.accepted
        self.proposed_drafts += record.proposal_length
        self.end_token_rounds += int(record.stopped_by_end_token)
        _add_at(self.committed_histogram, record.committed)
        for position in range(record.proposal_length):
            _add_at(self.proposed, position)
            if record.accepted > position:
                _add_at(self.survived, position)
            if record.accepted >= position:
                _add_at(self.reached, position)
        # Keep the three lists the same length so positions line up in reports.
        size = max(len(self.survived), len(self.proposed), len(self.reached))
        for counts in (self.survived, self.proposed, self.reached):
            if len(counts) < size:
                counts.extend([0] * (size - len(counts)))

    def add_result(self, result: GenerationResult) -> None:
        """Count one prompt: its generated tokens and every round."""
        self.prompts += 1
        self.generated_tokens += len(result.tokens)
        for record in result.rounds:
            self.add_round(record)

    def merge(self, other: AcceptanceSums) -> AcceptanceSums:
        """Return the sums of both operands (neither is changed)."""
        return AcceptanceSums(
            prompts=self.prompts + other.prompts,
            rounds=self.rounds + other.rounds,
            generated_tokens=self.generated_tokens + other.generated_tokens,
            committed_tokens=self.committed_tokens + other.committed_tokens,
            accepted_drafts=self.accepted_drafts + other.accepted_drafts,
            proposed_drafts=self.proposed_drafts + other.proposed_drafts,
            end_token_rounds=self.end_token_rounds + other.end_token_rounds,
            committed_histogram=_add_lists(self.committed_histogram, other.committed_histogram),
            survived=_add_lists(self.survived, other.survived),
            proposed=_add_lists(self.proposed, other.proposed),
            reached=_add_lists(self.reached, other.reached),
        )

    @classmethod
    def total(cls, parts: Iterable[AcceptanceSums]) -> AcceptanceSums:
        merged = cls()
        for part in parts:
            merged = merged.merge(part)
        return merged

    # Ratios. Each is None when its denominator is zero.

    @property
    def tau(self) -> float | None:
        """Mean committed tokens per round, the correction or bonus token included."""
        return _ratio(self.committed_tokens, self.rounds)

    @property
    def accepted_per_round(self) -> float | None:
        return _ratio(self.accepted_drafts, self.rounds)

    @property
    def drafts_per_proposal(self) -> float | None:
        return _ratio(self.proposed_drafts, self.rounds)

    @property
    def verify_rate(self) -> float | None:
        """Committed tokens per token the target verified (drafts plus the anchor of each round)."""
        return _ratio(self.committed_tokens, self.proposed_drafts + self.rounds)

    def survival(self) -> list[float | None]:
        return [_ratio(self.survived[k], self.proposed[k]) for k in range(len(self.proposed))]

    def conditional(self) -> list[float | None]:
        return [_ratio(self.survived[k], self.reached[k]) for k in range(len(self.proposed))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "rounds": self.rounds,
            "generated_tokens": self.generated_tokens,
            "committed_tokens": self.committed_tokens,
            "accepted_drafts": self.accepted_drafts,
            "proposed_drafts": self.proposed_drafts,
            "end_token_rounds": self.end_token_rounds,
            "committed_histogram": list(self.committed_histogram),
            "survived": list(self.survived),
            "proposed": list(self.proposed),
            "reached": list(self.reached),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcceptanceSums:
        return cls(**{key: list(value) if isinstance(value, list) else int(value) for key, value in data.items()})

    def summary(self) -> dict[str, Any]:
        """Return the ratios a report shows, next to the counts they come from."""
        return {
            "tau": self.tau,
            "accepted_per_round": self.accepted_per_round,
            "drafts_per_proposal": self.drafts_per_proposal,
            "verify_rate": self.verify_rate,
            "survival": self.survival(),
            "conditional": self.conditional(),
            "committed_histogram": list(self.committed_histogram),
            "prompts": self.prompts,
            "rounds": self.rounds,
            "generated_tokens": self.generated_tokens,
        }


def acceptance_sums(results: Iterable[GenerationResult]) -> AcceptanceSums:
    """Pool the rounds of many prompts into one set of sums."""
    sums = AcceptanceSums()
    for result in results:
        sums.add_result(result)
    return sums

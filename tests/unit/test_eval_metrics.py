"""Acceptance metrics pooled over rounds, their merge, and the evaluation report."""

from __future__ import annotations

import json

import pytest

from deepspec.eval.metrics import AcceptanceSums, acceptance_sums
from deepspec.eval.report import ALL_BENCHMARKS, build_report, render_markdown
from deepspec.eval.speculative import GenerationResult, RoundRecord


def round_record(proposal: int, accepted: int, end_token: bool = False) -> RoundRecord:
    committed = accepted if end_token else accepted + 1
    prefix = [index < accepted for index in range(proposal)]
    return RoundRecord(
        proposal_length=proposal,
        accepted=accepted,
        committed=committed,
        stopped_by_end_token=end_token,
        accept_prefix=prefix,
    )


def hand_made_results() -> list[GenerationResult]:
    """Two prompts, five rounds: (proposal, accepted) = (4,2) (4,4) (4,0) | (2,2, end token) (3,1)."""
    first = GenerationResult(
        prompt_length=5,
        tokens=list(range(10)),
        rounds=[round_record(4, 2), round_record(4, 4), round_record(4, 0)],
    )
    second = GenerationResult(
        prompt_length=7,
        tokens=list(range(5)),
        rounds=[round_record(3, 1), round_record(2, 2, end_token=True)],
        finish_reason="end_token",
    )
    return [first, second]


def test_tau_counts_bonus_and_end_token_rounds() -> None:
    sums = acceptance_sums(hand_made_results())
    assert sums.prompts == 2
    assert sums.rounds == 5
    assert sums.generated_tokens == 15
    # Committed per round: 3, 5, 1, 2, 2 (the end-token round has no bonus token).
    assert sums.tau == pytest.approx(13 / 5)
    assert sums.accepted_per_round == pytest.approx(9 / 5)
    assert sums.drafts_per_proposal == pytest.approx(17 / 5)
    assert sums.verify_rate == pytest.approx(13 / 22)
    assert sums.committed_histogram == [0, 1, 2, 1, 0, 1]
    assert sums.end_token_rounds == 1


def test_survival_differs_from_conditional() -> None:
    sums = acceptance_sums(hand_made_results())
    assert sums.survived == [4, 3, 1, 1]
    assert sums.proposed == [5, 5, 4, 3]
    assert sums.reached == [5, 4, 2, 1]
    assert sums.survival() == pytest.approx([4 / 5, 3 / 5, 1 / 4, 1 / 3])
    assert sums.conditional() == pytest.approx([4 / 5, 3 / 4, 1 / 2, 1.0])


def test_empty_sums_give_none() -> None:
    sums = AcceptanceSums()
    assert sums.tau is None
    assert sums.verify_rate is None
    assert sums.survival() == []
    zero_drafts = acceptance_sums([GenerationResult(prompt_length=3, tokens=[1], rounds=[round_record(0, 0)])])
    assert zero_drafts.tau == 1.0
    assert zero_drafts.survival() == []


def test_merge_equals_pooling() -> None:
    first, second = hand_made_results()
    merged = acceptance_sums([first]).merge(acceptance_sums([second]))
    assert merged == acceptance_sums([first, second])
    assert AcceptanceSums.total([acceptance_sums([first]), acceptance_sums([second])]) == merged
    # Lists of different lengths line up by position.
    assert acceptance_sums([second]).survived == [2, 1, 0]
    assert merged.survived == [4, 3, 1, 1]


def test_merge_leaves_operands_unchanged() -> None:
    first, second = hand_made_results()
    left, right = acceptance_sums([first]), acceptance_sums([second])
    before = left.to_dict()
    left.merge(right)
    assert left.to_dict() == before


def test_sums_round_trip_json() -> None:
    sums = acceptance_sums(hand_made_results())
    restored = AcceptanceSums.from_dict(json.loads(json.dumps(sums.to_dict())))
    assert restored == sums


def results_grid() -> dict[str, dict[float, dict[str, AcceptanceSums]]]:
    first, second = hand_made_results()
    return {
        "trained": {
            1.0: {"gsm8k": acceptance_sums([first]), "mbpp": acceptance_sums([second])},
            0.0: {"gsm8k": acceptance_sums([first, second])},
        },
        "untrained": {1.0: {"gsm8k": acceptance_sums([second]), "mbpp": acceptance_sums([second])}},
    }


def test_report_pools_and_averages() -> None:
    report = build_report(results_grid(), {"target": "toy"})
    assert report["target"] == "toy"
    assert report["drafts"] == ["trained", "untrained"]
    assert report["temperatures"] == [1.0, 0.0]
    assert report["benchmarks"] == ["gsm8k", "mbpp"]
    trained = report["results"]["trained"]["1.0"]
    assert trained["gsm8k"]["tau"] == pytest.approx(9 / 3)
    assert trained["mbpp"]["tau"] == pytest.approx(4 / 2)
    # The pooled row weighs rounds; the mean row weighs benchmarks equally.
    assert trained[ALL_BENCHMARKS]["tau"] == pytest.approx(13 / 5)
    assert report["mean_tau"]["trained"]["1.0"] == pytest.approx((3.0 + 2.0) / 2)
    assert trained["gsm8k"]["sums"]["rounds"] == 3
    json.dumps(report)


def test_markdown_tables() -> None:
    markdown = render_markdown(build_report(results_grid()))
    lines = markdown.splitlines()
    assert "| benchmark | trained T=1.0 | trained T=0.0 | untrained T=1.0 | untrained T=0.0 |" in lines
    assert "| gsm8k | 3.00 | 2.60 | 2.00 | - |" in lines
    assert "| mbpp | 2.00 | - | 2.00 | - |" in lines
    assert "| mean | 2.50 | 2.60 | 2.00 | - |" in lines
    header = next(line for line in lines if line.startswith("| draft | T | benchmark | rounds |"))
    assert "survival@3" in header
    assert "conditional@3" in header
    assert (
        "| trained | 0.0 | all | 5 | 0.8000 | 0.6000 | 0.2500 | 0.3333 | 0.8000 | 0.7500 | 0.5000 | 1.0000 |" in lines
    )

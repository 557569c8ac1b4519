"""Evaluation report: every metric as JSON, and Markdown tables of tau and per-position acceptance.

Results are keyed draft -> temperature -> benchmark. The JSON report also
contains, per draft and temperature, the rounds of all benchmarks pooled under
``ALL_BENCHMARKS`` and the unweighted mean of the benchmarks' tau, which is
how per-benchmark tables usually average. The Markdown is rendered from the
JSON report alone, so it can be rebuilt from ``report.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deepspec.eval.metrics import AcceptanceSums

ALL_BENCHMARKS = "all"

EvalResults = Mapping[str, Mapping[float, Mapping[str, AcceptanceSums]]]


def temperature_key(temperature: float) -> str:
    """Return the JSON key of a temperature, e.g. ``"1.0"`` or ``"0.0"``."""
    return str(float(temperature))


def _entry(sums: AcceptanceSums) -> dict[str, Any]:
    return {**sums.summary(), "sums": sums.to_dict()}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def build_report(results: EvalResults, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble the JSON report: per draft, temperature and benchmark, plus pooled and mean rows."""
    drafts = list(results)
    temperatures: list[float] = []
    benchmarks: list[str] = []
    for per_temperature in results.values():
        for temperature, per_benchmark in per_temperature.items():
            if float(temperature) not in temperatures:
                temperatures.append(float(temperature))
            for benchmark in per_benchmark:
                if benchmark not in benchmarks:
                    benchmarks.append(benchmark)

    table: dict[str, dict[str, dict[str, Any]]] = {}
    mean_tau: dict[str, dict[str, float | None]] = {}
    for draft, per_temperature in results.items():
        table[draft] = {}
        mean_tau[draft] = {}
        for temperature, per_benchmark in per_temperature.items():
            key = temperature_key(temperature)
            rows = {benchmark: _entry(sums) for benchmark, sums in per_benchmark.items()}
            rows[ALL_BENCHMARKS] = _entry(AcceptanceSums.total(per_benchmark.values()))
            table[draft][key] = rows
            mean_tau[draft][key] = _mean([sums.tau for sums in per_benchmark.values()])

    return {
        **dict(metadata or {}),
        "drafts": drafts,
        "temperatures": temperatures,
        "benchmarks": benchmarks,
        "results": table,
        "mean_tau": mean_tau,
    }


def _format(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _lookup(report: Mapping[str, Any], draft: str, key: str, benchmark: str) -> Mapping[str, Any] | None:
    return report["results"].get(draft, {}).get(key, {}).get(benchmark)


def render_markdown(report: Mapping[str, Any]) -> str:
    """Render the tau table (a row per benchmark plus the mean) and the per-position acceptance table."""
    drafts: list[str] = report["drafts"]
    keys = [temperature_key(temperature) for temperature in report["temperatures"]]
    benchmarks: list[str] = report["benchmarks"]
    columns = [(draft, key) for draft in drafts for key in keys]

    lines = [
        "## Accepted length tau",
        "",
        "Mean tokens committed per verify round, the correction or bonus token included, pooled over all "
        "rounds of a benchmark; the mean row averages the benchmarks with equal weight.",
        "",
    ]
    header = ["benchmark", *(f"{draft} T={key}" for draft, key in columns)]
    rows = []
    for benchmark in benchmarks:
        row = [benchmark]
        for draft, key in columns:
            entry = _lookup(report, draft, key, benchmark)
            row.append(_format(entry["tau"] if entry else None, 2))
        rows.append(row)
    rows.append(["mean", *(_format(report["mean_tau"].get(draft, {}).get(key), 2) for draft, key in columns)])
    lines.extend(_markdown_table(header, rows))

    positions = 0
    for draft, key in columns:
        for benchmark in [*benchmarks, ALL_BENCHMARKS]:
            entry = _lookup(report, draft, key, benchmark)
            if entry:
                positions = max(positions, len(entry["survival"]))
    lines += [
        "",
        "## Per-position acceptance",
        "",
        "survival@k: share of rounds whose drafts 1..k+1 were all accepted, among rounds that proposed more "
        "than k drafts. conditional@k: share of rounds that accepted draft k+1, among rounds that accepted "
        "drafts 1..k and proposed more than k drafts.",
        "",
    ]
    header = [
        "draft",
        "T",
        "benchmark",
        "rounds",
        *(f"survival@{k}" for k in range(positions)),
        *(f"conditional@{k}" for k in range(positions)),
    ]
    rows = []
    for draft, key in columns:
        for benchmark in [*benchmarks, ALL_BENCHMARKS]:
            entry = _lookup(report, draft, key, benchmark)
            if entry is None:
                continue
            survival = list(entry["survival"]) + [None] * (positions - len(entry["survival"]))
            conditional = list(entry["conditional"]) + [None] * (positions - len(entry["conditional"]))
            rows.append(
                [
                    draft,
                    key,
                    benchmark,
                    str(entry["rounds"]),
                    *(_format(value, 4) for value in survival),
                    *(_format(value, 4) for value in conditional),
                ]
            )
    lines.extend(_markdown_table(header, rows))
    return "\n".join(lines) + "\n"

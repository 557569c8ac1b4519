"""Side-by-side tau of several finished pipelines: a row per draft, a column per benchmark.

``deepspec compare A.yaml B.yaml C.yaml`` reads each config's eval report
(the stage must be done) and prints one Markdown table per temperature. The
row label is the draft algorithm, with the config file's stem added when two
configs share an algorithm.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec.config import PipelineConfig, load_config
from deepspec.manifest import StageInputError
from deepspec.pipeline import stage_fingerprints
from deepspec.storage import open_storage

REPORT_NAME = "report.json"


@dataclass(frozen=True)
class Row:
    label: str
    config_path: str
    report: dict[str, Any]


def read_eval_report(config: PipelineConfig, config_path: str) -> dict[str, Any]:
    """Return the finished eval report of ``config``; fail with the command to run when it is missing."""
    storage = open_storage(config)
    stage_fingerprint = stage_fingerprints(config)["eval"]
    if not storage.has_manifest("eval", stage_fingerprint):
        raise StageInputError(
            f"the eval stage of {config_path} has not finished ({storage.uri('eval', stage_fingerprint)} has no "
            f"manifest); run `deepspec run --config {config_path}` first"
        )
    storage.pull("eval", stage_fingerprint)
    path = storage.local_dir("eval", stage_fingerprint) / REPORT_NAME
    return json.loads(path.read_text(encoding="utf-8"))


def load_rows(config_paths: list[str]) -> list[Row]:
    configs = [(path, load_config(path)) for path in config_paths]
    algorithms = Counter(config.draft.algorithm for _, config in configs)
    rows = []
    for path, config in configs:
        label = config.draft.algorithm
        if algorithms[label] > 1:
            label = f"{label} ({Path(path).stem})"
        rows.append(Row(label, path, read_eval_report(config, path)))
    return rows


def comparison(rows: list[Row], draft: str = "trained") -> dict[str, Any]:
    """Return ``{temperature: {label: {benchmark: tau, "mean": tau}}}`` for the given draft of each report."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in rows:
        results = row.report["results"].get(draft, {})
        for temperature, per_benchmark in results.items():
            cells = {name: per_benchmark[name].get("tau") for name in row.report["benchmarks"] if name in per_benchmark}
            cells["mean"] = row.report["mean_tau"].get(draft, {}).get(temperature)
            table.setdefault(temperature, {})[row.label] = cells
    return table


def render_comparison(rows: list[Row], draft: str = "trained") -> str:
    """Render one Markdown table per temperature: a row per config, a column per benchmark plus the mean."""
    table = comparison(rows, draft)
    lines: list[str] = []
    for temperature in sorted(table, key=float):
        by_label = table[temperature]
        benchmarks: list[str] = []
        for cells in by_label.values():
            benchmarks += [name for name in cells if name != "mean" and name not in benchmarks]
        header = ["draft", *benchmarks, "mean"]
        lines += [f"## Accepted length tau, temperature {temperature}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for label, cells in by_label.items():
            values = [_format(cells.get(name)) for name in [*benchmarks, "mean"]]
            lines.append("| " + " | ".join([label, *values]) + " |")
        lines.append("")
    return "\n".join(lines)


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"

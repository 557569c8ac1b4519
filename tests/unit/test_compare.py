from pathlib import Path

import pytest
import yaml

from deepspec.eval.compare import Row, comparison, load_rows, render_comparison
from deepspec.manifest import StageInputError


def report(taus: dict[str, float], mean: float) -> dict:
    per_benchmark = {name: {"tau": tau} for name, tau in taus.items()}
    per_benchmark["all"] = {"tau": 9.9}
    return {
        "benchmarks": list(taus),
        "results": {"trained": {"0.0": per_benchmark}},
        "mean_tau": {"trained": {"0.0": mean}},
    }


def test_table_has_row_per_draft():
    rows = [
        Row("dspark", "a.yaml", report({"gsm8k": 3.0, "mbpp": 2.0}, 2.5)),
        Row("eagle3", "b.yaml", report({"gsm8k": 2.0, "mbpp": 1.5}, 1.75)),
    ]
    table = comparison(rows)
    assert table["0.0"]["dspark"] == {"gsm8k": 3.0, "mbpp": 2.0, "mean": 2.5}
    assert "all" not in table["0.0"]["eagle3"]
    text = render_comparison(rows)
    assert "| draft | gsm8k | mbpp | mean |" in text
    assert "| dspark | 3.00 | 2.00 | 2.50 |" in text
    assert "| eagle3 | 2.00 | 1.50 | 1.75 |" in text


def test_unfinished_config_names_command(tmp_path: Path):
    config = tmp_path / "demo.yaml"
    raw = {"data": {"sources": [{"name": "gsm8k"}]}, "storage": {"root": str(tmp_path / "runs")}}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(StageInputError, match="deepspec run --config"):
        load_rows([str(config)])

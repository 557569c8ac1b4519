"""Small pipeline configs on the tiny random target, shared by the integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deepspec.config import PipelineConfig, load_config
from tests.conftest import shared_eval_dir


def tiny_pipeline_raw(target_dir: Path, root: Path) -> dict[str, Any]:
    return {
        "target": {"name_or_path": str(target_dir)},
        "data": {
            "data_dir": str(shared_eval_dir()),
            "sources": [{"name": "gsm8k", "max_rows": 100}, {"name": "mt-bench", "max_rows": 20}],
            "heldout_fraction": 0.1,
        },
        "regen": {"batch_size": 16, "max_new_tokens": 16, "keep_truncated": True},
        "cache": {"layer_ids": [0, 1], "max_length": 384},
        "draft": {"num_layers": 1, "block_size": 3, "num_anchors": 8, "markov_rank": 8},
        "train": {"max_steps": 8, "global_batch_size": 4, "per_device_batch_size": 2, "checkpoint_every": 2},
        "eval": {"max_prompts_per_benchmark": 2, "max_new_tokens": 8, "temperatures": [0.0]},
        "storage": {"root": str(root)},
    }


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def tiny_pipeline_config(target_dir: Path, root: Path, directory: Path, **sections: Any) -> tuple[Path, PipelineConfig]:
    raw = tiny_pipeline_raw(target_dir, root)
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = write_config(directory / "config.yaml", raw)
    return path, load_config(path)

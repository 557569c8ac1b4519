"""Which settings each stage depends on, its fingerprint, and where its output lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepspec.config import PipelineConfig
from deepspec.manifest import fingerprint, stage_dir

STAGES = ("prompts", "regen", "cache", "train", "eval")
UPSTREAM = {"prompts": (), "regen": ("prompts",), "cache": ("regen",), "train": ("cache",), "eval": ("prompts", "train")}


def target_identity(config: PipelineConfig) -> dict[str, Any]:
    """Settings that identify the target model's weights and tokenizer."""
    target = config.target
    identity: dict[str, Any] = {"name_or_path": target.name_or_path, "revision": target.revision, "dtype": target.dtype}
    if target.name_or_path == "toy":
        identity["toy"] = target.toy.model_dump(mode="json")
    return identity


def stage_settings(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """Return the resolved settings that ``stage``'s output depends on (its fingerprint input)."""
    dump = config.model_dump(mode="json")
    if stage == "prompts":
        data = dict(dump["data"])
        # The folder only locates the files; moving them does not change the records.
        data.pop("data_dir")
        return {"data": data}
    if stage == "regen":
        return {"regen": dump["regen"], "target": target_identity(config)}
    if stage == "cache":
        return {"cache": dump["cache"], "target": target_identity(config)}
    if stage == "train":
        return {"draft": dump["draft"], "train": dump["train"]}
    if stage == "eval":
        return {"eval": dump["eval"], "target": target_identity(config)}
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


def stage_fingerprints(config: PipelineConfig) -> dict[str, str]:
    fingerprints: dict[str, str] = {}
    for stage in STAGES:
        inputs = {name: fingerprints[name] for name in UPSTREAM[stage]}
        fingerprints[stage] = fingerprint(stage, stage_settings(config, stage), inputs)
    return fingerprints


def stage_inputs(config: PipelineConfig, stage: str) -> dict[str, str]:
    fingerprints = stage_fingerprints(config)
    return {name: fingerprints[name] for name in UPSTREAM[stage]}


def stage_output(config: PipelineConfig, stage: str) -> Path:
    """Return ``<storage.root>/<stage>/<fingerprint>`` for this config."""
    return stage_dir(config.storage.root, stage, stage_fingerprints(config)[stage])

"""Which settings each stage depends on, its fingerprint, and where its output lives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepspec.config import ConfigError, PipelineConfig
from deepspec.manifest import fingerprint, stage_dir

DATA_DIR_ENV = "DEEPSPEC_DATA_DIR"

STAGES = ("prompts", "regen", "cache", "train", "eval")
# How many processes run a stage does not change its output: the data order and
# the global batch are defined independently of the world size.
LAUNCH_KEYS = ("nproc_per_node",)
UPSTREAM = {
    "prompts": (),
    "regen": ("prompts",),
    "cache": ("regen",),
    "train": ("cache",),
    "eval": ("prompts", "train"),
}


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
        regen = dict(dump["regen"])
        # Where the servers are and how requests are retried does not change the answers; the model name does.
        regen["openai"] = {"model": regen["openai"]["model"]}
        return {"regen": regen, "target": target_identity(config)}
    if stage == "cache":
        return {"cache": _without(dump["cache"], LAUNCH_KEYS), "target": target_identity(config)}
    if stage == "train":
        return {"draft": dump["draft"], "train": _without(dump["train"], LAUNCH_KEYS)}
    if stage == "eval":
        return {"eval": _eval_settings(dump["eval"]), "target": target_identity(config)}
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


def _eval_settings(section: dict[str, Any]) -> dict[str, Any]:
    """Return the eval settings with ``eval.draft`` replaced by the draft's content hash (dropped when unset)."""
    section = dict(section)
    draft = section.pop("draft", None)
    if draft is not None:
        from deepspec.drafts.checkpoint import external_draft_identity

        section["draft"] = external_draft_identity(draft)
    return section


def upstream_stages(config: PipelineConfig, stage: str) -> tuple[str, ...]:
    """Return the stages whose outputs ``stage`` reads; eval skips train when ``eval.draft`` names the draft."""
    if stage == "eval" and config.eval.draft is not None:
        return ("prompts",)
    return UPSTREAM[stage]


def _without(section: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in section.items() if key not in keys}


def stage_fingerprints(config: PipelineConfig) -> dict[str, str]:
    fingerprints: dict[str, str] = {}
    for stage in STAGES:
        inputs = {name: fingerprints[name] for name in upstream_stages(config, stage)}
        fingerprints[stage] = fingerprint(stage, stage_settings(config, stage), inputs)
    return fingerprints


def stage_inputs(config: PipelineConfig, stage: str) -> dict[str, str]:
    fingerprints = stage_fingerprints(config)
    return {name: fingerprints[name] for name in upstream_stages(config, stage)}


def stage_output(config: PipelineConfig, stage: str) -> Path:
    """Return ``<storage.root>/<stage>/<fingerprint>`` for this config."""
    return stage_dir(config.storage.root, stage, stage_fingerprints(config)[stage])


def resolve_data_dir(config: PipelineConfig) -> Path | None:
    """Return ``data.data_dir``, else ``$DEEPSPEC_DATA_DIR``, else None (sources then come from the hub)."""
    if config.data.data_dir:
        key, value = "data.data_dir", config.data.data_dir
    elif os.environ.get(DATA_DIR_ENV):
        key, value = DATA_DIR_ENV, os.environ[DATA_DIR_ENV]
    else:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"{key}={value!r} is not a directory; point it at the folder of benchmark JSONL files, "
            "or unset it to download the benchmark sets from the Hugging Face hub"
        )
    return path

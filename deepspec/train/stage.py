"""The ``train`` stage: train the draft on the target cache with torchrun DDP.

Usage::

    deepspec train --config configs/demo.yaml                       # one process
    torchrun --standalone --nproc_per_node 2 -m deepspec.cli train --config configs/demo.yaml
    torchx run dist.ddp -j 1x8 train                                # see .torchxconfig

Output, under ``<storage.root>/train/<fingerprint>/``: ``draft/`` (the final
draft in Hugging Face layout), ``checkpoints/`` (resumable state, rotated),
``metrics.jsonl``, ``summary.json``, ``config.yaml`` and ``_MANIFEST.json``
(last). A killed run resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from deepspec.cache.reader import CacheReader
from deepspec.config import ConfigError, PipelineConfig
from deepspec.drafts.checkpoint import save_draft
from deepspec.drafts.factory import build_draft_for_config
from deepspec.manifest import (
    atomic_write_json,
    file_entries,
    read_manifest,
    require_upstream,
    write_manifest,
    write_resolved_config,
)
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings
from deepspec.targets.loading import load_target, load_tokenizer
from deepspec.train.distributed import DistEnv, barrier, init_distributed, shutdown
from deepspec.train.trainer import Trainer

logger = logging.getLogger(__name__)

STAGE = "train"


def run_train(config: PipelineConfig) -> Path:
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("up to date: %s", output)
        return output
    env = init_distributed(config.train.backend)
    try:
        return _train(config, env, output)
    finally:
        shutdown()


def _train(config: PipelineConfig, env: DistEnv, output: Path) -> Path:
    started = time.monotonic()
    fingerprints = stage_fingerprints(config)
    require_upstream(config.storage.root, "cache", fingerprints["cache"], stage_settings(config, "cache"))
    cache = CacheReader(stage_output(config, "cache"))
    cache.check_compatible(list(config.cache.layer_ids), cache.hidden_size)
    if env.is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_resolved_config(output, config)
    barrier()

    torch.manual_seed(config.train.seed)
    draft = build_draft_for_config(config, load_target(config), load_tokenizer(config), seed=config.train.seed)
    if draft.config.hidden_size != cache.hidden_size:
        raise ConfigError(
            f"the cache at {stage_output(config, 'cache')} has hidden size {cache.hidden_size} but the target has "
            f"{draft.config.hidden_size}; the cache was built from another target"
        )
    trainer = Trainer(config, env, cache, draft, output)
    logger.info(
        "training %s: %d cached samples, %d steps, global batch %d = %d ranks x %d per device x %d accumulation",
        config.draft.algorithm,
        len(cache),
        config.train.max_steps,
        config.train.global_batch_size,
        env.world_size,
        config.train.per_device_batch_size,
        trainer.accumulation,
    )
    summary = trainer.train()
    if env.is_main:
        save_draft(trainer.draft, output / "draft")
        info = {
            "steps": summary.steps,
            "resumed_from_step": summary.resumed_from,
            "skipped_steps": summary.skipped_steps,
            "tokens_this_run": summary.tokens,
            "seconds_this_run": round(summary.seconds, 3),
            "tokens_per_second": round(summary.tokens_per_second, 1),
            "world_size": env.world_size,
            "final_loss": summary.history[-1]["loss"] if summary.history else None,
        }
        atomic_write_json(output / "summary.json", info)
        draft_files = sorted(str(path.relative_to(output)) for path in (output / "draft").iterdir())
        write_manifest(
            output,
            stage=STAGE,
            stage_fingerprint=fingerprints[STAGE],
            settings=stage_settings(config, STAGE),
            inputs=stage_inputs(config, STAGE),
            counts={"steps": summary.steps, "samples": summary.samples, "cache_samples": len(cache)},
            files=file_entries(output, draft_files + ["summary.json"]),
            timings={"total": time.monotonic() - started, "train_loop": summary.seconds},
            extra={"tokens_per_second": info["tokens_per_second"]},
        )
        logger.info(
            "trained %d steps at %.0f tokens/s; draft saved to %s",
            summary.steps,
            summary.tokens_per_second,
            output / "draft",
        )
        logger.info("summary: %s", json.dumps(info))
    barrier()
    return output

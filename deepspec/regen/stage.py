"""The ``regen`` stage: the target writes every assistant turn of the train prompts.

Usage::

    deepspec regen --config configs/demo.yaml

Input: ``train.jsonl`` of the prompts stage. Output, under
``<storage.root>/regen/<fingerprint>/``:

- ``records.jsonl``: canonical records whose assistant turns were all written by
  the target, sorted by id;
- ``rejects.jsonl``: records dropped, with the reason (``length``: an answer hit
  ``regen.max_new_tokens``; ``empty``: the target ended the turn at once);
- ``parts/``: per-chunk results, each published atomically, so a killed run
  resumes from the first missing chunk;
- ``config.yaml`` and ``_MANIFEST.json`` (last).

Multi-turn prompts are regenerated turn by turn: each user turn is sent with the
target's own earlier answers, and the given assistant turns are discarded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from deepspec.config import PipelineConfig
from deepspec.data.chat import render_prompt_ids
from deepspec.data.stage import read_records, write_jsonl_atomic
from deepspec.logs import Progress
from deepspec.manifest import (
    check_kept_fraction,
    file_entries,
    read_manifest,
    require_upstream,
    write_manifest,
    write_resolved_config,
)
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings
from deepspec.regen.local import LocalGenerator
from deepspec.targets.loading import end_token_ids, load_target, load_tokenizer

logger = logging.getLogger(__name__)

STAGE = "regen"


def run_regen(config: PipelineConfig) -> Path:
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("up to date: %s", output)
        return output
    fingerprints = stage_fingerprints(config)
    prompts_manifest = require_upstream(
        config.storage.root, "prompts", fingerprints["prompts"], stage_settings(config, "prompts")
    )
    prompts_dir = stage_output(config, "prompts")
    records = sorted(read_records(prompts_dir / "train.jsonl"), key=lambda record: record["id"])
    if config.regen.max_records is not None:
        records = records[: config.regen.max_records]
    logger.info(
        "regenerating %d train records from %s (%d in the prompts output)",
        len(records),
        prompts_dir,
        prompts_manifest["counts"].get("train", len(records)),
    )
    output.mkdir(parents=True, exist_ok=True)
    write_resolved_config(output, config)

    started = time.monotonic()
    tokenizer = load_tokenizer(config)
    model = load_target(config, device=_device())
    generator = LocalGenerator(model, tokenizer, config.regen, end_token_ids(model, tokenizer))
    records = _order_by_prompt_length(records, tokenizer)
    parts_dir = output / "parts"
    parts_dir.mkdir(exist_ok=True)
    chunk_size = config.regen.batch_size
    chunks = [records[start : start + chunk_size] for start in range(0, len(records), chunk_size)]
    progress = Progress(logger, "records", len(records))
    for index, chunk in enumerate(chunks):
        part = parts_dir / f"part-{index:05d}.jsonl"
        if part.exists():
            progress.update(len(chunk), note=f"part {index} already done")
            continue
        _seed_chunk(config.regen.seed, index)
        kept, rejected = regenerate_chunk(chunk, generator, tokenizer)
        # Rejects first, then the part: a part file marks the chunk as complete.
        write_jsonl_atomic(parts_dir / f"part-{index:05d}.rejects.jsonl", rejected)
        write_jsonl_atomic(part, kept)
        progress.update(len(chunk), note=f"part {index}: kept {len(kept)}/{len(chunk)}")
    progress.finish()
    return _finalize(config, output, parts_dir, len(chunks), len(records), time.monotonic() - started)


def regenerate_chunk(
    records: list[dict[str, Any]], generator: LocalGenerator, tokenizer: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Regenerate every assistant turn of ``records``, turn by turn across the chunk."""
    limit = prompt_token_limit(generator)
    pending = {record["id"]: _user_turns(record) for record in records}
    conversations: dict[str, list[dict[str, Any]]] = {
        record["id"]: [m for m in record["messages"] if m["role"] == "system"] for record in records
    }
    rejected: dict[str, dict[str, Any]] = {}
    turn = 0
    while True:
        active = [rid for rid, turns in pending.items() if rid not in rejected and turn < len(turns)]
        if not active:
            break
        prompts, generating = [], []
        for rid in active:
            conversations[rid].append({"role": "user", "content": pending[rid][turn]})
            prompt = render_prompt_ids(tokenizer, conversations[rid])
            if len(prompt) > limit:
                rejected[rid] = {"reason": "prompt_too_long", "detail": f"turn {turn}: {len(prompt)} > {limit} tokens"}
                continue
            prompts.append(prompt)
            generating.append(rid)
        if not generating:
            turn += 1
            continue
        for rid, completion in zip(generating, generator.generate(prompts), strict=True):
            if completion.finish_reason == "length" and not generator.settings.keep_truncated:
                rejected[rid] = {"reason": "length", "detail": f"turn {turn}: {completion.num_tokens} tokens"}
                continue
            if not completion.text.strip():
                rejected[rid] = {"reason": "empty", "detail": f"turn {turn}: the answer is empty"}
                continue
            conversations[rid].append({"role": "assistant", "content": completion.text})
        turn += 1

    kept, dropped = [], []
    for record in records:
        rid = record["id"]
        if rid in rejected:
            dropped.append({**rejected[rid], "id": rid, "record": record})
        else:
            kept.append({**record, "messages": conversations[rid]})
    return kept, dropped


def prompt_token_limit(generator: LocalGenerator) -> int:
    """Longest prompt to generate for: ``regen.max_prompt_tokens``, and room for the answer in the target's context."""
    settings = generator.settings
    context = getattr(generator.model.config, "max_position_embeddings", None)
    limit = settings.max_prompt_tokens
    if context is not None:
        limit = min(limit, int(context) - settings.max_new_tokens)
    return limit


def _order_by_prompt_length(records: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Sort records by the length of their first prompt (then id), so each batch pads little."""

    def first_prompt_length(record: dict[str, Any]) -> int:
        first_user = next(index for index, m in enumerate(record["messages"]) if m["role"] == "user")
        return len(render_prompt_ids(tokenizer, record["messages"][: first_user + 1]))

    return sorted(records, key=lambda record: (first_prompt_length(record), record["id"]))


def _user_turns(record: dict[str, Any]) -> list[str]:
    return [message["content"] for message in record["messages"] if message["role"] == "user"]


def _finalize(
    config: PipelineConfig, output: Path, parts_dir: Path, num_chunks: int, num_records: int, seconds: float
) -> Path:
    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for index in range(num_chunks):
        kept.extend(read_records(parts_dir / f"part-{index:05d}.jsonl"))
        rejects.extend(read_records(parts_dir / f"part-{index:05d}.rejects.jsonl"))
    reasons = Counter(reject["reason"] for reject in rejects)
    kept.sort(key=lambda record: record["id"])
    write_jsonl_atomic(output / "records.jsonl", kept)
    write_jsonl_atomic(output / "rejects.jsonl", rejects)
    check_kept_fraction(
        STAGE, len(kept), num_records, config.regen.min_kept_fraction, "regen.min_kept_fraction", reasons
    )
    answer_chars = sum(
        len(message["content"] or "")
        for record in kept
        for message in record["messages"]
        if message["role"] == "assistant"
    )
    write_manifest(
        output,
        stage=STAGE,
        stage_fingerprint=stage_fingerprints(config)[STAGE],
        settings=stage_settings(config, STAGE),
        inputs=stage_inputs(config, STAGE),
        counts={"in": num_records, "out": len(kept), "rejected": sum(reasons.values()), "answer_chars": answer_chars},
        rejected=dict(reasons),
        files=file_entries(output, ["records.jsonl", "rejects.jsonl"]),
        timings={"total": seconds},
    )
    logger.info(
        "kept %d/%d records; rejected %s; output %s",
        len(kept),
        num_records,
        dict(reasons) or "none",
        output,
    )
    return output


def _seed_chunk(seed: int, index: int) -> None:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

"""The ``regen`` stage: the target writes every assistant turn of the train prompts.

Usage::

    deepspec regen --config configs/demo.yaml
    deepspec regen --config configs/qwen3.yaml --shard-index 0 --num-shards 8   # one of 8 shards
    deepspec regen --config configs/qwen3.yaml --finalize                       # merge the finished shards

Input: ``train.jsonl`` of the prompts stage. Output, under
``<storage.root>/regen/<fingerprint>/``:

- ``records.jsonl``: canonical records whose assistant turns were all written by
  the target, sorted by id;
- ``rejects.jsonl``: records dropped, with the reason (``length``: an answer hit
  ``regen.max_new_tokens``; ``empty``: the target ended the turn at once;
  ``reasoning_only``: a thinking target wrote reasoning but no answer;
  ``prompt_too_long``);
- ``failures.jsonl`` (openai backend): records whose request failed, with the
  error; they are in neither file above and are retried by the next run of
  their shard until the stage is finalized;
- ``parts/`` (local backend): per-chunk results, each published atomically, so a
  killed run resumes from the first missing chunk;
- ``shards/`` (openai backend): per-shard result files appended record by
  record, see :mod:`deepspec.regen.shards`;
- ``config.yaml`` and ``_MANIFEST.json`` (last).

Multi-turn prompts are regenerated turn by turn: each user turn is sent with the
target's own earlier answers, and the given assistant turns are discarded.

The openai backend resumes by record id: a rerun regenerates only the records
of its shard that have no line in the shard's records or rejects file, whatever
the order of the prompts. Sharding is a launch setting and does not change the
fingerprint: shard ``i`` of ``n`` owns the records whose id hashes to ``i``.
A single-shard run publishes the output itself; with several shards,
``deepspec regen --finalize`` merges them once all have finished (shard pods
never finalize, so two pods cannot write the merged files at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from deepspec import __version__
from deepspec.config import PipelineConfig
from deepspec.data.chat import SystemPromptPolicy, render_prompt_ids
from deepspec.data.stage import read_records, write_jsonl_atomic
from deepspec.logs import Progress
from deepspec.manifest import (
    StageError,
    check_kept_fraction,
    describe_settings_diff,
    file_entries,
    read_manifest,
    require_upstream,
    write_manifest,
    write_resolved_config,
)
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings
from deepspec.regen import shards
from deepspec.regen.local import LocalGenerator
from deepspec.regen.serve import served_model_name
from deepspec.regen.shards import ShardSpec
from deepspec.targets.loading import end_token_ids, load_target, load_tokenizer

logger = logging.getLogger(__name__)

STAGE = "regen"


def run_regen(config: PipelineConfig, shard: ShardSpec | None = None) -> Path:
    """Regenerate this config's train records (one shard of them when ``shard`` is given); return the output."""
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("up to date: %s", output)
        return output
    if config.regen.backend == "openai":
        return run_openai_regen(config, shard or ShardSpec())
    if shard is not None and shard.num_shards > 1:
        raise StageError(
            f"--num-shards {shard.num_shards} needs regen.backend openai; the local backend runs as one process"
        )
    records = _train_records(config)
    output.mkdir(parents=True, exist_ok=True)
    write_resolved_config(output, config)

    started = time.monotonic()
    tokenizer = load_tokenizer(config)
    model = load_target(config, device=_device())
    generator = LocalGenerator(model, tokenizer, config.regen, end_token_ids(model, tokenizer))
    records = _order_by_prompt_length(records, tokenizer, config.regen.system_prompt_policy)
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
    pin = regen_pin(config, tokenizer)
    return _finalize(config, output, parts_dir, len(chunks), len(records), time.monotonic() - started, pin)


def _train_records(config: PipelineConfig) -> list[dict[str, Any]]:
    """Return the prompts stage's train records sorted by id, cut to ``regen.max_records``."""
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
    return records


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
            prompt = render_prompt_ids(tokenizer, conversations[rid], generator.settings.system_prompt_policy)
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


def _order_by_prompt_length(
    records: list[dict[str, Any]], tokenizer: Any, policy: SystemPromptPolicy
) -> list[dict[str, Any]]:
    """Sort records by the length of their first prompt (then id), so each batch pads little."""

    def first_prompt_length(record: dict[str, Any]) -> int:
        first_user = next(index for index, m in enumerate(record["messages"]) if m["role"] == "user")
        return len(render_prompt_ids(tokenizer, record["messages"][: first_user + 1], policy))

    return sorted(records, key=lambda record: (first_prompt_length(record), record["id"]))


def _user_turns(record: dict[str, Any]) -> list[str]:
    return [message["content"] for message in record["messages"] if message["role"] == "user"]


def _finalize(
    config: PipelineConfig,
    output: Path,
    parts_dir: Path,
    num_chunks: int,
    num_records: int,
    seconds: float,
    pin: dict[str, Any],
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
        extra={"regen": pin},
    )
    logger.info(
        "kept %d/%d records; rejected %s (total %d); output %s",
        len(kept),
        num_records,
        dict(reasons) or "none",
        sum(reasons.values()),
        output,
    )
    return output


def _seed_chunk(seed: int, index: int) -> None:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def regen_pin(config: PipelineConfig, tokenizer: Any) -> dict[str, Any]:
    """Return what the answers depend on beyond the config file: recorded in the manifest, checked on resume."""
    regen = config.regen
    template = getattr(tokenizer, "chat_template", None)
    pin: dict[str, Any] = {
        "backend": regen.backend,
        "source_fingerprint": stage_fingerprints(config)["prompts"],
        "model": served_model_name(config),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()
        if isinstance(template, str)
        else None,
        "system_prompt_policy": regen.system_prompt_policy,
        "deepspec_version": __version__,
    }
    if regen.backend == "openai":
        from deepspec.regen.openai_backend import sampling_settings

        pin["sampling"] = sampling_settings(regen)
    else:
        pin["sampling"] = {"temperature": regen.temperature, "top_p": regen.top_p, "top_k": regen.top_k}
        pin["sampling"].update(max_tokens=regen.max_new_tokens, seed=regen.seed)
    return pin


def run_openai_regen(config: PipelineConfig, shard: ShardSpec) -> Path:
    """Regenerate one shard's missing records through the servers; publish the output when there is one shard."""
    from deepspec.regen.openai_backend import RegenAborted, RunCounts, client_settings, regenerate_records

    output = stage_output(config, STAGE)
    records = _train_records(config)
    output.mkdir(parents=True, exist_ok=True)
    if not (output / "config.yaml").is_file():
        # Shards resolve the same config; the first one to start writes it.
        write_resolved_config(output, config)
    tokenizer = load_tokenizer(config)
    directory = shards.shard_dir(output, shard)
    shards.check_pin(directory, regen_pin(config, tokenizer))

    mine = [record for record in records if shard.owns(str(record["id"]))]
    done = {
        shards.entry_id(entry)
        for name in (shards.RECORDS_NAME, shards.REJECTS_NAME)
        for entry in shards.read_entries(directory / name)
    }
    todo = [record for record in mine if str(record["id"]) not in done]
    logger.info(
        "shard %d of %d owns %d of %d records; %d already done, %d to generate; output %s",
        shard.index,
        shard.num_shards,
        len(mine),
        len(records),
        len(mine) - len(todo),
        len(todo),
        directory,
    )
    started = time.monotonic()
    counts = RunCounts()
    if todo:
        api_key = _api_key(config)
        settings = client_settings(config.regen, served_model_name(config), api_key)
        writer = _ShardWriter(directory, config.regen.batch_size, len(todo))
        try:
            counts = asyncio.run(regenerate_records(todo, settings, config.regen, tokenizer, writer.add))
        except RegenAborted as error:
            raise StageError(
                f"regen stopped: {error}. {writer.counts.kept} records were kept in this run and are saved; "
                "run the same command again to resume with the rest"
            ) from error
        finally:
            writer.close()
    seconds = time.monotonic() - started
    shards.write_shard_manifest(
        directory,
        shard,
        {
            "owned": len(mine),
            "generated_this_run": len(todo),
            "kept_this_run": counts.kept,
            "rejected_this_run": dict(counts.rejected),
            "failed_this_run": counts.failed,
            "requests_this_run": counts.requests,
            "seconds_this_run": round(seconds, 3),
        },
    )
    if shard.num_shards == 1:
        return finalize_regen(config)
    missing = [spec.name for spec in _expected_shards(shard.num_shards) if _shard_missing(output, spec)]
    logger.info(
        "shard %s done; %s, then run `deepspec regen --finalize`",
        shard.name,
        f"waiting for shards {missing}" if missing else "every shard is done",
    )
    return output


def _api_key(config: PipelineConfig) -> str | None:
    name = config.regen.openai.api_key_env
    if name is None:
        return None
    value = os.environ.get(name)
    if not value:
        raise StageError(
            f"regen.openai.api_key_env={name!r} but the environment variable {name} is not set; export it, "
            "or set regen.openai.api_key_env to null for servers without an API key"
        )
    return value


class _ShardWriter:
    """Append each finished record to its shard file at once; fsync the files every ``batch_size`` records."""

    def __init__(self, directory: Path, batch_size: int, total: int) -> None:
        from deepspec.regen.openai_backend import RunCounts

        self.records = shards.open_append_log(directory / shards.RECORDS_NAME)
        self.rejects = shards.open_append_log(directory / shards.REJECTS_NAME)
        # Failures are retried by every run, so the file lists only the latest run's failures.
        self.failures = shards.open_append_log(directory / shards.FAILURES_NAME, truncate=True)
        self.batch_size = batch_size
        self.counts = RunCounts()
        self.progress = Progress(logger, "records", total)
        self._unsynced = 0

    def add(self, outcome: Any) -> None:
        self.counts.add(outcome)
        if outcome.kind == "kept":
            shards.append_entry(self.records, outcome.record)
        elif outcome.kind == "rejected":
            shards.append_entry(self.rejects, outcome.reject_entry())
        else:
            shards.append_entry(self.failures, outcome.failure_entry())
        self._unsynced += 1
        if self._unsynced >= self.batch_size:
            self.sync()
        self.progress.update(1, note=f"kept {self.counts.kept}, failed {self.counts.failed}")

    def sync(self) -> None:
        for handle in (self.records, self.rejects, self.failures):
            shards.sync(handle)
        self._unsynced = 0

    def close(self) -> None:
        self.sync()
        for handle in (self.records, self.rejects, self.failures):
            handle.close()
        self.progress.finish()


def _expected_shards(num_shards: int) -> list[ShardSpec]:
    return [ShardSpec(index, num_shards) for index in range(num_shards)]


def _shard_missing(output: Path, spec: ShardSpec) -> bool:
    return shards.read_shard_manifest(shards.shard_dir(output, spec)) is None


def finalize_regen(config: PipelineConfig) -> Path:
    """Merge every shard's results into the stage output and write the manifest last."""
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("up to date: %s", output)
        return output
    started = time.monotonic()
    found = shards.shard_specs_on_disk(output)
    counts_of_shards = sorted({spec.num_shards for spec in found})
    if not found:
        raise StageError(f"no regen shards under {output}; run `deepspec regen` (with the openai backend) first")
    if len(counts_of_shards) > 1:
        raise StageError(
            f"{output / shards.SHARDS_DIR} contains shards of runs split {counts_of_shards} ways; keep the folders "
            "of one split and delete the others"
        )
    num_shards = counts_of_shards[0]
    missing = [spec.name for spec in _expected_shards(num_shards) if _shard_missing(output, spec)]
    if missing:
        raise StageError(
            f"shards {missing} of {num_shards} have not finished; run `deepspec regen --num-shards {num_shards} "
            "--shard-index I` for each, then finalize again"
        )
    pins = {spec.name: shards.read_pin(shards.shard_dir(output, spec)) or {} for spec in _expected_shards(num_shards)}
    first_name, first_pin = next(iter(pins.items()))
    for name, pin in pins.items():
        differences = describe_settings_diff(first_pin, pin)
        if differences:
            raise StageError(
                f"shard {name} was generated with other settings than shard {first_name}: {'; '.join(differences)}; "
                f"delete {shards.shard_dir(output, ShardSpec(int(name[:5]), num_shards))} and rerun that shard"
            )

    records = _train_records(config)
    wanted = {str(record["id"]) for record in records}
    kept: dict[str, dict[str, Any]] = {}
    rejects: dict[str, dict[str, Any]] = {}
    failures: dict[str, dict[str, Any]] = {}
    for spec in _expected_shards(num_shards):
        directory = shards.shard_dir(output, spec)
        for name, into in (
            (shards.RECORDS_NAME, kept),
            (shards.REJECTS_NAME, rejects),
            (shards.FAILURES_NAME, failures),
        ):
            for entry in shards.read_entries(directory / name):
                record_id = shards.entry_id(entry)
                # Records removed from the prompts since they were generated are left out.
                if record_id in wanted and spec.owns(record_id):
                    into.setdefault(record_id, entry)
    failures = {rid: entry for rid, entry in failures.items() if rid not in kept and rid not in rejects}
    unaccounted = sorted(wanted - set(kept) - set(rejects) - set(failures))
    if unaccounted:
        owners = sorted({shards.shard_of(rid, num_shards) for rid in unaccounted})
        raise StageError(
            f"{len(unaccounted)} train records (e.g. {unaccounted[:3]}) have no result; the prompts changed after "
            f"shards {owners} finished, so rerun `deepspec regen --num-shards {num_shards} --shard-index I` for those"
        )

    reasons = Counter(entry["reason"] for entry in rejects.values())
    write_jsonl_atomic(output / "records.jsonl", [kept[rid] for rid in sorted(kept)])
    write_jsonl_atomic(output / "rejects.jsonl", [rejects[rid] for rid in sorted(rejects)])
    write_jsonl_atomic(output / shards.FAILURES_NAME, [failures[rid] for rid in sorted(failures)])
    dropped = dict(reasons)
    if failures:
        dropped["request_failed"] = len(failures)
    check_kept_fraction(
        STAGE, len(kept), len(records), config.regen.min_kept_fraction, "regen.min_kept_fraction", dropped
    )
    answer_chars = sum(
        len(message["content"] or "")
        for record in kept.values()
        for message in record["messages"]
        if message["role"] == "assistant"
    )
    shard_seconds = sum(
        float(
            (shards.read_shard_manifest(shards.shard_dir(output, spec)) or {})
            .get("counts", {})
            .get("seconds_this_run", 0)
        )
        for spec in _expected_shards(num_shards)
    )
    write_manifest(
        output,
        stage=STAGE,
        stage_fingerprint=stage_fingerprints(config)[STAGE],
        settings=stage_settings(config, STAGE),
        inputs=stage_inputs(config, STAGE),
        counts={
            "in": len(records),
            "out": len(kept),
            "rejected": sum(reasons.values()),
            "failed": len(failures),
            "answer_chars": answer_chars,
            "shards": num_shards,
        },
        rejected=dict(reasons),
        files=file_entries(output, ["records.jsonl", "rejects.jsonl", shards.FAILURES_NAME]),
        timings={"shards_last_run": shard_seconds, "finalize": time.monotonic() - started},
        extra={"regen": first_pin},
    )
    logger.info(
        "kept %d/%d records; rejected %s (total %d); failed %d; output %s",
        len(kept),
        len(records),
        dict(reasons) or "none",
        sum(reasons.values()),
        len(failures),
        output,
    )
    return output

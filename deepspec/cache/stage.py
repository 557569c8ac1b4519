"""The ``cache`` stage: run the target over the regenerated records and store its hidden states.

Local, one process::

    python -m deepspec.cache.stage --config configs/demo.yaml

One node, several processes (each rank builds the units ``u`` with
``u % WORLD_SIZE == RANK``, then rank 0 finalizes)::

    torchrun --nproc_per_node 8 -m deepspec.cache.stage --config configs/qwen3_4b.yaml

Kubernetes: the same torchrun command in an Indexed Job or PyTorchJob pod.
After a kill, rerunning the same command resumes: finished units are kept as
they are and only missing units are built. When every unit exists but the
finalize step did not run, ``python -m deepspec.cache.stage --config X
--finalize`` publishes the cache without loading the target.

CPU smoke run: a config whose ``target.name_or_path`` is a tiny local model
directory and ``cache.batch_size: 4`` finishes in seconds.

The format of the output directory is documented in ``deepspec.cache.format``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

from deepspec import __version__
from deepspec.cache.format import (
    CACHE_INFO_NAME,
    INDEX_NAME,
    RECORD_IDS_NAME,
    REJECTS_NAME,
    UNIT_RECORDS,
    CacheFormatError,
    Layout,
    UnitWriter,
    load_unit_indices,
    num_units,
    unit_is_complete,
    unit_records,
    write_cache_files,
)
from deepspec.config import PipelineConfig, load_config
from deepspec.data.chat import render_training_example
from deepspec.data.records import Rejection
from deepspec.data.stage import read_records
from deepspec.launch.worldsize import check_world_size
from deepspec.logs import Progress, setup_logging
from deepspec.manifest import (
    check_kept_fraction,
    file_entries,
    read_manifest,
    require_upstream,
    write_manifest,
    write_resolved_config,
)
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings, target_identity
from deepspec.runtime import configure_runtime
from deepspec.targets.capture import capture_hidden_states
from deepspec.targets.loading import (
    hidden_size,
    load_target,
    load_tokenizer,
    num_target_layers,
    validate_layer_ids,
)

logger = logging.getLogger(__name__)

STAGE = "cache"
UPSTREAM = "regen"
RECORDS_NAME = "records.jsonl"
# Ranks wait at the barrier until the slowest rank has built its units.
# NOTE: a rank that needs longer than this after the first one finished makes the barrier time out.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)

# NOTE: with an s3:// storage.root the stage writes into a local mirror that deepspec.storage uploads;
# a multi-node build therefore needs a shared folder (see deepspec.storage).


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun launch (RANK is the global rank); 0 of 1 without torchrun."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> RankEnv:
        check_world_size()
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            text = os.environ.get(name, "")
            try:
                values[name] = int(text) if text else default
            except ValueError as error:
                raise ValueError(f"environment variable {name}={text!r} must be an integer") from error
        env = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        if env.world_size < 1 or not 0 <= env.rank < env.world_size:
            raise ValueError(f"RANK={env.rank} must be in [0, WORLD_SIZE={env.world_size}); launch with torchrun")
        return env

    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _read_upstream_records(config: PipelineConfig) -> list[dict[str, Any]]:
    """Return the regenerated records this config implies, sorted by id; fail if that output does not exist."""
    fingerprints = stage_fingerprints(config)
    require_upstream(config.storage.root, UPSTREAM, fingerprints[UPSTREAM], stage_settings(config, UPSTREAM))
    path = stage_output(config, UPSTREAM) / RECORDS_NAME
    records = sorted(read_records(path), key=lambda record: str(record["id"]))
    ids = [str(record["id"]) for record in records]
    duplicates = sorted(record_id for record_id, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{path} contains duplicate record ids {duplicates[:5]}; rerun the regen stage")
    return records


def _chat_template_sha256(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _writer_info(config: PipelineConfig, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Settings and versions stored in every unit index (and, from unit 0, in cache_info.json)."""
    settings = config.cache
    return {
        "target": {**target_identity(config), "num_layers": num_target_layers(model.config)},
        "chat_template_sha256": _chat_template_sha256(tokenizer),
        "max_length": settings.max_length,
        "overlong": settings.overlong,
        "min_loss_tokens": settings.min_loss_tokens,
        "batch_size": settings.batch_size,
        "versions": {"deepspec": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


def _pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.int64)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


class UnitBuilder:
    """Render, capture and write the units assigned to one rank."""

    def __init__(self, config: PipelineConfig, output: Path, device: torch.device) -> None:
        self.config = config
        self.output = output
        self.device = device
        self.model = load_target(config, device=device)
        depth = num_target_layers(self.model.config)
        validate_layer_ids(list(config.cache.layer_ids), depth, key="cache.layer_ids")
        self.tokenizer = load_tokenizer(config)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.layout = Layout(tuple(config.cache.layer_ids), hidden_size(self.model.config), config.cache.hidden_dtype)
        self.storage_dtype = torch.bfloat16 if self.layout.hidden_dtype == "bfloat16" else torch.float32
        self.writer_info = _writer_info(config, self.model, self.tokenizer)
        self.rejected: Counter[str] = Counter()
        self.kept = 0
        self.tokens = 0

    def build(self, unit: int, records: Sequence[dict[str, Any]]) -> None:
        started = time.monotonic()
        settings = self.config.cache
        ids = [str(record["id"]) for record in records]
        with UnitWriter(self.output, unit, ids, self.layout, self.writer_info) as writer:
            examples: list[tuple[str, list[int], list[int]]] = []
            for record_id, record in zip(ids, records, strict=True):
                messages = record.get("messages")
                if not isinstance(messages, list):
                    self._reject(writer, record_id, "invalid_record", "the record has no messages list", record)
                    continue
                result = render_training_example(
                    self.tokenizer,
                    messages,
                    settings.max_length,
                    settings.overlong,
                    settings.min_loss_tokens,
                    system_prompt_policy=self.config.regen.system_prompt_policy,
                )
                if isinstance(result, Rejection):
                    self._reject(writer, record_id, result.reason, result.detail, record)
                    continue
                examples.append((record_id, list(result.input_ids), list(result.loss_mask)))
            # Batches of similar length waste less compute on padding; the index keeps record order.
            examples.sort(key=lambda example: len(example[1]))
            for start in range(0, len(examples), settings.batch_size):
                self._write_batch(writer, examples[start : start + settings.batch_size])
            writer.commit(elapsed_s=time.monotonic() - started)

    def _reject(self, writer: UnitWriter, record_id: str, reason: str, detail: str, record: Any) -> None:
        self.rejected[reason] += 1
        writer.add_reject(record_id, reason, detail, record)

    def _write_batch(self, writer: UnitWriter, batch: Sequence[tuple[str, list[int], list[int]]]) -> None:
        input_ids, attention_mask = _pad_right([example[1] for example in batch], self.pad_id)
        with torch.inference_mode():
            target_hidden, last_hidden = capture_hidden_states(
                self.model,
                input_ids.to(self.device),
                attention_mask.to(self.device),
                list(self.config.cache.layer_ids),
            )
            target_hidden = target_hidden.to(self.storage_dtype).cpu()
            last_hidden = last_hidden.to(self.storage_dtype).cpu()
        for row, (record_id, ids, loss_mask) in enumerate(batch):
            length = len(ids)
            writer.add_sample(record_id, ids, loss_mask, target_hidden[row, :length], last_hidden[row, :length])
            self.kept += 1
            self.tokens += length


def _join_group(env: RankEnv) -> bool:
    """Join a gloo process group when WORLD_SIZE > 1; it only carries the barrier before finalize."""
    if env.world_size == 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return True


def run_cache(config: PipelineConfig) -> Path:
    """Build this rank's missing units, wait for every rank, and finalize on rank 0. Return the output folder."""
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("cache output %s is up to date", output)
        return output

    env = RankEnv.from_environ()
    records = _read_upstream_records(config)
    output.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        write_resolved_config(output, config)
    total_units = num_units(len(records))
    mine = [unit for unit in range(total_units) if unit % env.world_size == env.rank]
    pending = [unit for unit in mine if not unit_is_complete(output, unit)]
    logger.info(
        "%d records in %d units of %d; this rank (%d of %d) owns %d units, %d already built; output %s",
        len(records),
        total_units,
        UNIT_RECORDS,
        env.rank,
        env.world_size,
        len(mine),
        len(mine) - len(pending),
        output,
    )

    grouped = _join_group(env)
    try:
        if pending:
            _build_units(config, output, records, pending, env)
        if grouped:
            dist.barrier()
        if env.rank == 0:
            finalize_cache(config)
    finally:
        if grouped:
            dist.destroy_process_group()
    return output


def _build_units(
    config: PipelineConfig, output: Path, records: Sequence[dict[str, Any]], units: Sequence[int], env: RankEnv
) -> None:
    started = time.monotonic()
    builder = UnitBuilder(config, output, env.device())
    logger.info(
        "target loaded on %s: %d layers, hidden size %d; capturing layers %s as %s",
        builder.device,
        num_target_layers(builder.model.config),
        builder.layout.hidden_size,
        list(builder.layout.layer_ids),
        builder.layout.hidden_dtype,
    )
    total = sum(len(unit_records(records, unit)) for unit in units)
    progress = Progress(logger, "records", total)
    for unit in units:
        chunk = unit_records(records, unit)
        builder.build(unit, chunk)
        progress.update(len(chunk), note=f"unit {unit} done, kept {builder.kept}, tokens {builder.tokens}")
    seconds = time.monotonic() - started
    rejected = ", ".join(f"{reason}={count}" for reason, count in sorted(builder.rejected.items())) or "none"
    progress.finish(
        f"{len(units)} units built, kept {builder.kept}, rejected {rejected}, "
        f"{builder.tokens / max(seconds, 1e-9):.0f} tokens/s"
    )


def finalize_cache(config: PipelineConfig) -> Path:
    """Merge the finished units into the cache index and info, then write the stage manifest last."""
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("cache output %s is up to date", output)
        return output
    started = time.monotonic()
    records = _read_upstream_records(config)
    record_ids = [str(record["id"]) for record in records]
    units = load_unit_indices(output, num_units(len(record_ids)))
    for unit in units:
        expected = unit_records(record_ids, unit["unit"])
        if unit["records"] != expected:
            raise CacheFormatError(
                f"unit {unit['unit']} in {output} was built from other records than the regen output lists now; "
                f"delete {output} and rerun the cache stage"
            )

    rejected: Counter[str] = Counter()
    for unit in units:
        rejected.update(unit["rejected"])
    kept = sum(len(unit["samples"]) for unit in units)
    settings = config.cache
    check_kept_fraction(
        STAGE, kept, len(record_ids), settings.min_kept_fraction, "cache.min_kept_fraction", dict(rejected)
    )
    _warn_mixed_writers(units)

    fingerprints = stage_fingerprints(config)
    upstream_manifest = read_manifest(stage_output(config, UPSTREAM)) or {}
    records_entry = upstream_manifest.get("files", {}).get(RECORDS_NAME, {})
    layout = Layout.from_dict(units[0]["layout"])
    if list(layout.layer_ids) != list(settings.layer_ids) or layout.hidden_dtype != settings.hidden_dtype:
        raise CacheFormatError(f"the units in {output} were written with {layout.to_dict()}, not with this config")
    extra = dict(units[0]["writer"])
    extra["source"] = {
        "stage": UPSTREAM,
        "fingerprint": fingerprints[UPSTREAM],
        "records_file": RECORDS_NAME,
        "records_sha256": records_entry.get("sha256"),
    }
    info = write_cache_files(output, units, extra)
    if not (output / "config.yaml").is_file():
        write_resolved_config(output, config)

    files = {shard["file_name"]: {"bytes": shard["bytes"], "sha256": shard["sha256"]} for shard in info["shards"]}
    files.update(file_entries(output, [INDEX_NAME, RECORD_IDS_NAME, REJECTS_NAME, CACHE_INFO_NAME, "config.yaml"]))
    num_rejected = sum(rejected.values())
    write_manifest(
        output,
        stage=STAGE,
        stage_fingerprint=fingerprints[STAGE],
        settings=stage_settings(config, STAGE),
        inputs=stage_inputs(config, STAGE),
        counts={
            "in": len(record_ids),
            "out": kept,
            "rejected": num_rejected,
            "tokens": info["total_tokens"],
            "supervised_tokens": info["supervised_tokens"],
            "shards": info["num_shards"],
            "data_bytes": info["data_bytes"],
        },
        rejected=dict(rejected),
        files=files,
        timings={
            "units_s": sum(float(unit.get("elapsed_s", 0.0)) for unit in units),
            "finalize_s": time.monotonic() - started,
        },
        extra={"cache_info": CACHE_INFO_NAME},
    )
    logger.info(
        "cache finished: %d/%d records kept (%d rejected), %d tokens, %d bytes/token, %.1f MB in %d shards at %s",
        kept,
        len(record_ids),
        num_rejected,
        info["total_tokens"],
        info["bytes_per_token"],
        info["data_bytes"] / 1e6,
        info["num_shards"],
        output,
    )
    return output


def _warn_mixed_writers(units: Sequence[dict[str, Any]]) -> None:
    reference = units[0]["writer"]
    for unit in units[1:]:
        differing = sorted(
            key for key in set(reference) | set(unit["writer"]) if reference.get(key) != unit["writer"].get(key)
        )
        if differing:
            logger.warning(
                "unit %d was written with other %s than unit 0 (a resumed run with other software?); "
                "cache_info.json records unit 0's values",
                unit["unit"],
                ", ".join(differing),
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepspec.cache.stage", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="pipeline YAML file (default: the DEEPSPEC_CONFIG environment variable)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument(
        "--finalize", action="store_true", help="only merge finished units and publish the cache (no target needed)"
    )
    args = parser.parse_args(argv)
    configure_runtime()
    setup_logging(STAGE)
    config = load_config(args.config, args.overrides)
    if args.finalize:
        finalize_cache(config)
    else:
        run_cache(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

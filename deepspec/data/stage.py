"""The ``prompts`` stage: read every source, normalise rows, drop duplicates, split train/held-out.

Usage::

    deepspec prompts --config configs/demo.yaml

Output, under ``<storage.root>/prompts/<fingerprint>/``:

- ``train.jsonl`` and ``heldout.jsonl``: one canonical record per line (see
  :mod:`deepspec.data.records`) with its ``"split"``, sorted by id, so the
  files do not depend on row order;
- ``rejects.jsonl``: every dropped row with its reason (``invalid_json``,
  ``duplicate``, ``consecutive_user_turns``, ...);
- ``config.yaml``: the resolved config;
- ``_MANIFEST.json``, written last: counts per source and split, rejects by
  reason, file sizes and checksums, source checksums, timings.

Records with the same id (the same system and user turns) are kept once: the
first occurrence, in the order of ``data.sources`` and then of the rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from deepspec.config import PipelineConfig, SourceConfig
from deepspec.data.records import Conversation, Rejection, normalize_row, split_of
from deepspec.data.sources import describe_source, iter_source_rows
from deepspec.logs import Progress
from deepspec.manifest import (
    REJECTS_NAME,
    RejectLog,
    check_kept_fraction,
    file_entries,
    fsync_dir,
    read_manifest,
    write_manifest,
    write_resolved_config,
)
from deepspec.pipeline import resolve_data_dir, stage_fingerprints, stage_inputs, stage_output, stage_settings

logger = logging.getLogger(__name__)

STAGE = "prompts"
# Characters that str.splitlines treats as line breaks but json.dumps(ensure_ascii=False) leaves raw.
_LINE_BREAK_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"


def run_prompts(config: PipelineConfig) -> Path:
    """Build the prompts output for ``config``, or return the existing one."""
    output = stage_output(config, STAGE)
    if read_manifest(output) is not None:
        logger.info("up to date: %s", output)
        return output
    output.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(config)
    started = time.monotonic()

    records: dict[str, Conversation] = {}
    per_source: dict[str, dict[str, Any]] = {}
    with RejectLog(output / REJECTS_NAME) as rejects:
        for source in config.data.sources:
            origin = describe_source(source, data_dir)
            counts = _read_source(source, data_dir, records, rejects)
            per_source[source.name] = {"origin": origin, **counts}
            logger.info(
                "source %s: %d rows, %d kept, %d rejected (%s)",
                source.name,
                counts["rows"],
                counts["kept"],
                counts["rows"] - counts["kept"],
                _format_reasons(counts["rejected"]),
            )
    read_seconds = time.monotonic() - started

    total_rows = sum(entry["rows"] for entry in per_source.values())
    check_kept_fraction(
        STAGE, len(records), total_rows, config.data.min_kept_fraction, "data.min_kept_fraction", rejects.counts
    )

    write_started = time.monotonic()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    fixed_split = {source.name: source.split for source in config.data.sources if source.split != "auto"}
    for record_id in sorted(records):
        record = records[record_id]
        split = fixed_split.get(record["source"]) or split_of(
            record_id, config.data.heldout_fraction, config.data.split_salt
        )
        splits[split].append({**record, "split": split})
        per_source[record["source"]][split] += 1
    write_jsonl_atomic(output / TRAIN_FILE, splits["train"])
    write_jsonl_atomic(output / HELDOUT_FILE, splits["heldout"])
    write_resolved_config(output, config)
    write_seconds = time.monotonic() - write_started

    counts = {
        "rows": total_rows,
        "kept": len(records),
        "rejected": rejects.total,
        "train": len(splits["train"]),
        "heldout": len(splits["heldout"]),
    }
    write_manifest(
        output,
        stage=STAGE,
        stage_fingerprint=stage_fingerprints(config)[STAGE],
        settings=stage_settings(config, STAGE),
        inputs=stage_inputs(config, STAGE),
        counts=counts,
        rejected=dict(rejects.counts),
        files=file_entries(output, [TRAIN_FILE, HELDOUT_FILE, REJECTS_NAME, "config.yaml"]),
        timings={"read": read_seconds, "write": write_seconds, "total": time.monotonic() - started},
        extra={"sources": per_source},
    )
    logger.info(
        "kept %d/%d rows: %d train, %d heldout; rejected %s; output %s",
        len(records),
        total_rows,
        counts["train"],
        counts["heldout"],
        _format_reasons(dict(rejects.counts)),
        output,
    )
    return output


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file of records written by a stage. A malformed line raises ValueError naming its file and line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number} is not valid JSON ({error.msg}). The stage output is damaged: "
                    "delete its folder and run the stage again"
                ) from error
    return records


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON Lines to a temporary file, fsync it, and rename it over ``path``.

    Text stays UTF-8, except for U+0085, U+2028 and U+2029, which are written as
    JSON escapes so that readers splitting on any line break still see one record per line.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False).translate(_LINE_BREAK_ESCAPES) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_source(
    source: SourceConfig, data_dir: Path | None, records: dict[str, Conversation], rejects: RejectLog
) -> dict[str, Any]:
    """Normalise every row of ``source`` into ``records`` and return its counts (split counts start at 0)."""
    rows = kept = 0
    reasons: Counter[str] = Counter()
    progress = Progress(logger, f"{source.name}.rows", None)
    for row in iter_source_rows(source, data_dir):
        rows += 1
        progress.update()
        result = row if isinstance(row, Rejection) else normalize_row(row, source.name)
        if isinstance(result, Rejection):
            reasons[result.reason] += 1
            detail = f"{source.name}: {result.detail}"
            rejects.add(result.reason, record_id=result.record_id, detail=detail, record=result.row)
            continue
        previous = records.get(result["id"])
        if previous is not None:
            reasons["duplicate"] += 1
            rejects.add(
                "duplicate",
                record_id=result["id"],
                detail=f"{source.name}: same system and user turns as a record of source {previous['source']!r}",
                record=row,
            )
            continue
        records[result["id"]] = result
        kept += 1
    return {"rows": rows, "kept": kept, "train": 0, "heldout": 0, "rejected": dict(reasons)}


def _format_reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(reasons.items())) or "none"

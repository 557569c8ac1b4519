"""Shards of the regen stage: which records a shard owns, its append-only result files, its manifest and pin.

Layout under the stage output::

    shards/00000-of-00002/_PIN.json        what this shard's answers depend on (written first)
    shards/00000-of-00002/records.jsonl    one regenerated record per line, appended as each finishes
    shards/00000-of-00002/rejects.jsonl    one rejected record per line, with the reason
    shards/00000-of-00002/failures.jsonl   records whose request failed in the latest run (retried next run)
    shards/00000-of-00002/_SHARD.json      written when a run of the shard has handled every record it owns

Each result line is one ``write`` of a whole record, so a crash can only leave a
torn last line; :func:`open_append_log` cuts it off before appending again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deepspec.manifest import StageError, atomic_write_json, describe_settings_diff

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PIN_NAME = "_PIN.json"
SHARD_MANIFEST_NAME = "_SHARD.json"
RECORDS_NAME = "records.jsonl"
REJECTS_NAME = "rejects.jsonl"
FAILURES_NAME = "failures.jsonl"
JOB_INDEX_ENV = "JOB_COMPLETION_INDEX"
_SHARD_DIR_PATTERN = re.compile(r"^(\d{5})-of-(\d{5})$")


@dataclass(frozen=True)
class ShardSpec:
    """This process's slice of the records: those whose id hashes to ``index`` modulo ``num_shards``."""

    index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"--num-shards must be at least 1, got {self.num_shards}")
        if not 0 <= self.index < self.num_shards:
            raise ValueError(
                f"--shard-index {self.index} must be in [0, --num-shards={self.num_shards}); "
                f"on Kubernetes set completions to {self.num_shards} in the Indexed Job"
            )

    @classmethod
    def resolve(cls, index: int | None, num_shards: int | None, environ: Mapping[str, str] | None = None) -> ShardSpec:
        """Build the spec from the command-line flags, taking the index from JOB_COMPLETION_INDEX if unset."""
        env = os.environ if environ is None else environ
        if index is None and env.get(JOB_INDEX_ENV) not in (None, ""):
            text = env[JOB_INDEX_ENV]
            try:
                index = int(text)
            except ValueError as error:
                raise ValueError(f"{JOB_INDEX_ENV}={text!r} is not an integer") from error
            if num_shards is None:
                raise ValueError(
                    f"{JOB_INDEX_ENV}={text} is set but --num-shards is not; pass --num-shards equal to the "
                    "Indexed Job's completions"
                )
        if index is not None and num_shards is None:
            raise ValueError(f"--shard-index {index} needs --num-shards")
        return cls(index or 0, num_shards or 1)

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.num_shards:05d}"

    def owns(self, record_id: str) -> bool:
        return shard_of(record_id, self.num_shards) == self.index


def shard_of(record_id: str, num_shards: int) -> int:
    """Return the shard of a record id: stable across runs, orderings and machines."""
    digest = hashlib.sha256(f"regen-shard\x00{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_dir(output: Path, spec: ShardSpec) -> Path:
    return output / SHARDS_DIR / spec.name


def shard_specs_on_disk(output: Path) -> list[ShardSpec]:
    """Return the shard directories found under ``output``, sorted."""
    root = output / SHARDS_DIR
    specs = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            match = _SHARD_DIR_PATTERN.match(entry.name)
            if match and entry.is_dir():
                specs.append(ShardSpec(int(match.group(1)), int(match.group(2))))
    return specs


def check_pin(directory: Path, pin: Mapping[str, Any]) -> None:
    """Write the shard's pin on first use; on resume, stop if anything the answers depend on has changed."""
    path = directory / PIN_NAME
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        differences = describe_settings_diff(pin, found)
        if differences:
            raise StageError(
                f"{directory} contains answers generated with other settings, so resuming would mix them: "
                f"{'; '.join(differences)}. Restore those settings to resume, or delete {directory} to start "
                "this shard over"
            )
        return
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, dict(pin))


def read_pin(directory: Path) -> dict[str, Any] | None:
    path = directory / PIN_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Return the complete lines of a result file as dicts, ignoring a torn last line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    entries = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise StageError(
                f"{path}:{number} is not valid JSON ({error}); delete the shard folder to redo it"
            ) from None
    return entries


def entry_id(entry: Mapping[str, Any]) -> str:
    return str(entry["id"])


def open_append_log(path: Path, truncate: bool = False) -> IO[str]:
    """Open a result file for appending, cutting off a torn last line left by a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if truncate or not path.exists():
        return open(path, "w", encoding="utf-8")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        logger.warning("%s: dropping a torn last line of %d bytes left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    return open(path, "a", encoding="utf-8")


def append_entry(handle: IO[str], entry: Mapping[str, Any]) -> None:
    """Append one whole entry as a single line with a single write, then hand it to the OS."""
    handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    handle.flush()


def sync(handle: IO[str]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def write_shard_manifest(directory: Path, spec: ShardSpec, counts: Mapping[str, Any]) -> None:
    atomic_write_json(
        directory / SHARD_MANIFEST_NAME,
        {"shard": spec.index, "num_shards": spec.num_shards, "counts": dict(counts)},
    )


def read_shard_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / SHARD_MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

"""Stage outputs: fingerprints, atomic files, the ``_MANIFEST.json`` written last, rejects.

Every stage writes under ``<storage.root>/<stage>/<fingerprint>/``. The
fingerprint hashes the settings the stage depends on plus the fingerprints of
its inputs, so two configs that agree upstream share upstream outputs. An
output directory without a manifest is unfinished and is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepspec import __version__

MANIFEST_NAME = "_MANIFEST.json"
REJECTS_NAME = "rejects.jsonl"
FORMAT_VERSION = 1


class StageError(RuntimeError):
    """A stage stopped for a reason the user can fix. The message names what to change."""


class StageInputError(StageError):
    """An upstream output is missing or was produced with other settings."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(stage: str, settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Hash a stage's settings and its inputs' fingerprints into a 16-hex-digit id."""
    payload = canonical_json(
        {"stage": stage, "format": FORMAT_VERSION, "settings": dict(settings), "inputs": dict(inputs)}
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def stage_dir(root: str | os.PathLike[str], stage: str, stage_fingerprint: str) -> Path:
    return Path(root) / stage / stage_fingerprint


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it, and rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Host and pid: pods that share a volume may run processes with the same pid.
    tmp = target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Return ``{name: {"bytes": n, "sha256": hex}}`` for files in ``directory``."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)} for name in names
    }


def write_resolved_config(directory: str | os.PathLike[str], config: Any) -> None:
    """Write the fully resolved config (defaults filled in) as ``config.yaml`` next to a stage's output."""
    import yaml

    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(Path(directory) / "config.yaml", text)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the manifest of a finished output, or None when the output is missing or unfinished."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_manifest(
    directory: str | os.PathLike[str],
    *,
    stage: str,
    stage_fingerprint: str,
    settings: Mapping[str, Any],
    inputs: Mapping[str, str],
    counts: Mapping[str, int],
    rejected: Mapping[str, int] | None = None,
    files: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Publish a stage output. Call this only after every data file is durable."""
    manifest = {
        "stage": stage,
        "fingerprint": stage_fingerprint,
        "format": FORMAT_VERSION,
        "deepspec_version": __version__,
        "settings": dict(settings),
        "inputs": dict(inputs),
        "counts": dict(counts),
        "rejected": dict(rejected or {}),
        "files": dict(files or {}),
        "timings_s": {key: round(value, 3) for key, value in (timings or {}).items()},
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


def require_upstream(
    root: str | os.PathLike[str], stage: str, stage_fingerprint: str, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Return the manifest of the upstream output this config implies, or explain why it is unusable."""
    directory = stage_dir(root, stage, stage_fingerprint)
    manifest = read_manifest(directory)
    if manifest is not None:
        return manifest
    others = []
    stage_root = Path(root) / stage
    if stage_root.is_dir():
        for candidate in sorted(stage_root.iterdir()):
            found = read_manifest(candidate)
            if found is not None:
                others.append(found)
    message = f"no finished {stage} output at {directory}; run `deepspec {stage}` with this config first"
    if others:
        diffs = [describe_settings_diff(settings, other.get("settings", {})) for other in others]
        nearest = min(diffs, key=len)
        message += (
            f". {len(others)} other {stage} output(s) exist under {stage_root} but were produced with other "
            f"settings; the closest differs in: {'; '.join(nearest) or 'its inputs'}"
        )
    raise StageInputError(message)


def describe_settings_diff(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    """List ``key: found -> expected`` lines for every differing leaf setting."""
    lines: list[str] = []
    for key in sorted(set(expected) | set(found)):
        dotted = f"{prefix}{key}"
        left, right = found.get(key), expected.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            lines.extend(describe_settings_diff(right, left, prefix=f"{dotted}."))
        elif left != right:
            lines.append(f"{dotted}: {left!r} there, {right!r} in this config")
    return lines


class RejectLog:
    """Counts rejected records by reason and appends each one, with its reason, to a JSONL file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.counts: Counter[str] = Counter()
        self._handle = open(self.path, "w", encoding="utf-8")

    def add(self, reason: str, *, record_id: str | None = None, detail: str = "", record: Any = None) -> None:
        self.counts[reason] += 1
        entry = {"reason": reason, "id": record_id, "detail": detail, "record": record}
        self._handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_kept_fraction(
    stage: str, kept: int, total: int, minimum: float, key: str, rejected: Mapping[str, int]
) -> None:
    """Fail a stage whose share of kept records fell below ``minimum``."""
    if total == 0:
        raise StageError(f"{stage}: no input records; check the upstream output and the data sources")
    fraction = kept / total
    if fraction < minimum:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(rejected.items())) or "none"
        raise StageError(
            f"{stage}: kept {kept}/{total} records ({fraction:.1%}), below {key}={minimum}; "
            f"rejected by reason: {reasons}. Inspect the rejects file, fix the input, or lower {key}."
        )

"""Rows of one prompt source: a local JSONL or Parquet file, a Hugging Face dataset, or a named benchmark.

A source config picks one of three locations:

- ``path``: a ``.jsonl``/``.json`` (JSON Lines) or ``.parquet`` file; a relative
  path resolves against the data folder (``data.data_dir`` or
  ``DEEPSPEC_DATA_DIR``), else against the working directory;
- ``hf_id``: read with ``datasets.load_dataset(hf_id, hf_config,
  split=hf_split)``; ``hf_id`` may also be a local dataset folder or a single
  local data file;
- neither: the source name is a benchmark. ``<data folder>/<name>.jsonl`` is
  used when it exists; otherwise the benchmark is read from the hub and each
  row is converted to ``{"turns": [...]}`` (see :mod:`deepspec.data.benchmarks`).

Offline hub access: set ``DEEPSPEC_HF_MIRROR`` to a folder laid out as
``<mirror>/<hub id>/...``, where each ``<hub id>`` folder is a copy of that
dataset repository, README.md with its ``configs:`` header included (for
example made with ``huggingface-cli download --repo-type dataset <hub id>
--local-dir <mirror>/<hub id>``). Every hub id then resolves to its mirror
folder and nothing is downloaded. A hub id missing from the mirror is an error,
so a mirrored run never falls back to the network.

Rows come out as dicts, in source order. A line that is not valid JSON (or
not valid UTF-8) is yielded as a :class:`~deepspec.data.records.Rejection` with
reason ``invalid_json`` and the file and line number in its detail. Such a
line still counts as a source row for ``max_rows``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from deepspec.config import SourceConfig
from deepspec.data.benchmarks import BenchmarkSpec, benchmark_spec, format_benchmark_rows
from deepspec.data.records import Rejection
from deepspec.manifest import sha256_file

HF_MIRROR_ENV = "DEEPSPEC_HF_MIRROR"

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

SourceRow = dict[str, Any] | Rejection


def iter_source_rows(source: SourceConfig, data_dir: Path | None) -> Iterator[SourceRow]:
    """Yield the rows of ``source``, at most ``source.max_rows`` of them.

    A missing file or mirror folder raises here, before the first row is read.
    """
    rows = _open_rows(source, data_dir)
    if source.max_rows is not None:
        return islice(rows, source.max_rows)
    return rows


def describe_source(source: SourceConfig, data_dir: Path | None) -> dict[str, Any]:
    """Return where ``source`` was read from, with a checksum for local files, for the stage manifest."""
    local = _local_file(source, data_dir)
    if local is not None:
        return {"kind": "file", "path": str(local), "bytes": local.stat().st_size, "sha256": sha256_file(local)}
    if source.hf_id is not None:
        return {
            "kind": "dataset",
            "hf_id": source.hf_id,
            "hf_config": source.hf_config,
            "hf_split": source.hf_split,
            "location": resolve_hub_id(source.hf_id),
        }
    spec = benchmark_spec(source.name)
    return {
        "kind": "benchmark",
        "hf_id": spec.hub_id,
        "hf_config": spec.hub_config,
        "hf_split": spec.hub_split,
        "files": list(spec.files),
        "location": resolve_hub_id(spec.hub_id),
    }


def resolve_source_path(name: str, path_text: str, data_dir: Path | None) -> Path:
    """Return the file of a ``path`` source, or raise naming the key, the resolved path and the fix."""
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = (data_dir / path) if data_dir is not None else Path.cwd() / path
    if not path.is_file():
        where = f"data.data_dir={data_dir}" if data_dir is not None else "the working directory"
        raise FileNotFoundError(
            f"data source {name!r}: path {path_text!r} resolves to {path}, which is not a file "
            f"(relative paths resolve against {where}). Fix the path or set data.data_dir"
        )
    return path


def iter_file_rows(path: Path) -> Iterator[SourceRow]:
    """Yield the rows of a JSON Lines or Parquet file."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _iter_parquet(path)
    if suffix in JSONL_SUFFIXES:
        return _iter_jsonl(path)
    supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
    raise ValueError(f"cannot read {path}: unsupported file suffix {suffix!r}, use one of {supported}")


def resolve_hub_id(hub_id: str) -> str:
    """Return a local path for ``hub_id`` when there is one (an existing path or the mirror), else the id."""
    as_path = Path(hub_id).expanduser()
    if as_path.exists():
        return str(as_path)
    mirror = os.environ.get(HF_MIRROR_ENV)
    if not mirror:
        return hub_id
    local = Path(mirror).expanduser() / hub_id
    if not local.exists():
        raise FileNotFoundError(
            f"{HF_MIRROR_ENV}={mirror} is set but {local} does not exist. Copy the dataset repository "
            f"{hub_id!r} there, or unset {HF_MIRROR_ENV} to download it from the hub"
        )
    return str(local)


def iter_hub_dataset(hub_id: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    """Stream the rows of a hub dataset, a local dataset folder or a local data file, in file order."""
    location = resolve_hub_id(hub_id)
    return _stream_dataset(location, config, split)


def _open_rows(source: SourceConfig, data_dir: Path | None) -> Iterator[SourceRow]:
    local = _local_file(source, data_dir)
    if local is not None:
        return iter_file_rows(local)
    if source.hf_id is not None:
        return iter_hub_dataset(source.hf_id, source.hf_config, source.hf_split)
    spec = benchmark_spec(source.name)
    resolve_hub_id(spec.hub_id)  # raises now when the mirror lacks this benchmark
    return format_benchmark_rows(spec, _iter_benchmark_source(spec))


def _local_file(source: SourceConfig, data_dir: Path | None) -> Path | None:
    """Return the local file a source reads: its ``path``, or ``<data folder>/<name>.jsonl`` for a benchmark."""
    if source.path is not None:
        return resolve_source_path(source.name, source.path, data_dir)
    if source.hf_id is None and data_dir is not None:
        candidate = data_dir / f"{source.name}.jsonl"
        if candidate.is_file():
            return candidate
    return None


def _iter_jsonl(path: Path) -> Iterator[SourceRow]:
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield Rejection("invalid_json", f"{path}:{line_number}: not valid UTF-8 ({error.reason})")
            except json.JSONDecodeError as error:
                text = raw.decode("utf-8").strip()
                yield Rejection("invalid_json", f"{path}:{line_number}: {error}", row=text)


def _iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches():
        yield from batch.to_pylist()


def _stream_dataset(location: str, config: str | None, split: str) -> Iterator[dict[str, Any]]:
    from datasets import load_dataset

    builder = _file_builder(location)
    if builder is not None:
        # A single data file: the packaged builders name their only split "train".
        dataset = load_dataset(builder, data_files=location, split="train", streaming=True)
    else:
        dataset = load_dataset(location, config, split=split, streaming=True)
    yield from dataset


def _file_builder(location: str) -> str | None:
    path = Path(location)
    if not path.is_file():
        return None
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    builder = builders.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"cannot read {location}: unsupported data file suffix, use one of {', '.join(builders)}")
    return builder


def _iter_benchmark_source(spec: BenchmarkSpec) -> Iterator[dict[str, Any]]:
    """Yield the raw rows of a benchmark: its dataset split, or its listed repository files in order."""
    if not spec.files:
        yield from iter_hub_dataset(spec.hub_id, spec.hub_config, spec.hub_split)
        return
    for filename in spec.files:
        path = _repository_file(spec.hub_id, filename)
        for row in iter_file_rows(path):
            if isinstance(row, Rejection):
                raise ValueError(f"benchmark {spec.name!r}: {row.detail}")
            yield row


def _repository_file(hub_id: str, filename: str) -> Path:
    if os.environ.get(HF_MIRROR_ENV) or Path(hub_id).expanduser().exists():
        path = Path(resolve_hub_id(hub_id)) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the local copy of {hub_id!r} must contain {filename}")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(hub_id, filename=filename, repo_type="dataset"))

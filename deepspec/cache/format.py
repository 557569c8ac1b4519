"""On-disk format of the target cache, and the writer of its units.

A cache output directory (``<storage.root>/cache/<fingerprint>/``) contains:

``shards/unit-NNNNN.bin``
    The samples of one unit. The regenerated records, sorted by id, are cut
    into units of ``UNIT_RECORDS`` consecutive records; unit ``u`` contains
    records ``u*UNIT_RECORDS .. (u+1)*UNIT_RECORDS - 1``. One sample of ``S``
    tokens is written as four arrays back to back, little-endian, without
    padding or alignment:

    ====================  =====================================  ===========
    field                 dtype                                  shape
    ====================  =====================================  ===========
    input_ids             int32                                  [S]
    loss_mask             uint8 (0 or 1)                         [S]
    target_hidden         ``hidden_dtype`` (bfloat16 raw bits    [S, L*H]
                          as uint16, or float32)
    target_last_hidden    ``hidden_dtype``                       [S, H]
    ====================  =====================================  ===========

    ``target_hidden`` row ``t`` is the outputs of the captured decoder layers
    at token ``t`` concatenated in ``layer_ids`` order. These are raw layer
    outputs (the residual stream before the final norm). Layer id ``-1`` is
    the embedding output. ``target_last_hidden`` is the output of the final
    norm, before the LM head. Samples inside a shard are grouped by the
    batches they were computed in, so the shard order is not the sample
    order. The index gives each sample's offset.

``shards/unit-NNNNN.idx.json``
    The unit's index. A unit is complete exactly when this file exists. It is
    written last (temporary name, fsync, rename) after the shard and the
    rejects file. Fields: ``format``, ``version``, ``unit``, ``shard`` (file
    name), ``shard_bytes``, ``shard_sha256`` (computed while writing),
    ``layout`` (``layer_ids``, ``hidden_size``, ``hidden_dtype``), ``records``
    (the unit's record ids in order), ``samples`` (one entry per kept record,
    in record order: ``id``, ``offset`` of its input_ids in the shard,
    ``seq_len``, ``loss_tokens``), ``rejected`` (count per reason) and
    ``writer`` (settings of the process that wrote it: target identity,
    chat-template hash, max_length, ...) and ``elapsed_s`` (build time).

``shards/unit-NNNNN.rejects.jsonl``
    The unit's rejected records, one JSON object per line (``reason``,
    ``id``, ``detail``, ``record``). Written only when the unit rejected
    something, always before the unit's index.

``index.bin``
    The merged index: one fixed ``INDEX_DTYPE`` record (24 bytes) per sample,
    in sample order: ``shard`` (u32, shard id = unit number), ``seq_len``
    (u32), ``loss_tokens`` (u32, supervised tokens), ``reserved`` (u32, 0),
    ``offset`` (u64, byte offset of the sample's input_ids in its shard).
    Sample order is unit order, then record order inside a unit, so it does
    not depend on how many ranks built the cache.

``record_ids.json``
    JSON list: the source record id of every sample, in sample order.

``rejects.jsonl``
    Every unit's rejects file concatenated in unit order.

``cache_info.json``
    Everything a reader needs to interpret and validate the data, written by
    the finalize step: ``format``, ``version``, ``unit_records``,
    ``num_samples``, ``num_records``, ``num_units``, ``num_shards``,
    ``layer_ids``, ``num_layers``, ``hidden_size``, ``hidden_dtype``,
    ``token_dtype``, ``mask_dtype``, ``index_record_size``,
    ``total_tokens``, ``supervised_tokens``, ``bytes_per_token``,
    ``data_bytes``, ``rejected`` (count per reason), ``shards`` (``shard_id``,
    ``file_name``, ``bytes``, ``sha256``, ``num_samples``), plus the settings
    the stage adds: ``max_length``, ``overlong``, ``min_loss_tokens``,
    ``target`` (name, revision, dtype, depth), ``chat_template_sha256``,
    ``source`` (regen fingerprint and records checksum) and ``versions``.

``_MANIFEST.json``
    The stage manifest, written last. A directory without it is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from deepspec.manifest import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir

FORMAT_NAME = "deepspec-target-cache"
FORMAT_VERSION = 1
UNIT_RECORDS = 64

SHARDS_DIR = "shards"
CACHE_INFO_NAME = "cache_info.json"
INDEX_NAME = "index.bin"
RECORD_IDS_NAME = "record_ids.json"
REJECTS_NAME = "rejects.jsonl"

TOKEN_DTYPE = "int32"
MASK_DTYPE = "uint8"
HIDDEN_DTYPES: dict[str, int] = {"bfloat16": 2, "float32": 4}
INDEX_DTYPE = np.dtype(
    [("shard", "<u4"), ("seq_len", "<u4"), ("loss_tokens", "<u4"), ("reserved", "<u4"), ("offset", "<u8")]
)
RecordT = TypeVar("RecordT")

LAYER_SEMANTICS = "decoder-layer outputs before the final norm (-1: embedding output); last hidden after the final norm"


class CacheFormatError(ValueError):
    """A cache file is missing, truncated or inconsistent with the cache's own metadata."""


@dataclass(frozen=True)
class Layout:
    """Shape and dtype of the hidden states in every sample of one cache."""

    layer_ids: tuple[int, ...]
    hidden_size: int
    hidden_dtype: str

    def __post_init__(self) -> None:
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype {self.hidden_dtype!r} is not supported; use one of {sorted(HIDDEN_DTYPES)}")
        if not self.layer_ids:
            raise ValueError("layer_ids is empty; a cache captures at least one layer")
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {self.hidden_size}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def itemsize(self) -> int:
        return HIDDEN_DTYPES[self.hidden_dtype]

    @property
    def bytes_per_token(self) -> int:
        """Shard bytes per token: 4 (id) + 1 (mask) + (L + 1) * H * itemsize (hidden states)."""
        return 4 + 1 + (self.num_layers + 1) * self.hidden_size * self.itemsize

    def sample_bytes(self, seq_len: int) -> int:
        return seq_len * self.bytes_per_token

    def field_offsets(self, seq_len: int) -> tuple[int, int, int, int]:
        """Byte offsets of input_ids, loss_mask, target_hidden and target_last_hidden inside one sample."""
        mask = 4 * seq_len
        hidden = mask + seq_len
        last = hidden + seq_len * self.num_layers * self.hidden_size * self.itemsize
        return 0, mask, hidden, last

    def to_dict(self) -> dict[str, Any]:
        return {"layer_ids": list(self.layer_ids), "hidden_size": self.hidden_size, "hidden_dtype": self.hidden_dtype}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Layout:
        return cls(tuple(int(i) for i in value["layer_ids"]), int(value["hidden_size"]), str(value["hidden_dtype"]))


def num_units(num_records: int) -> int:
    return (num_records + UNIT_RECORDS - 1) // UNIT_RECORDS


def unit_records(records: Sequence[RecordT], unit: int) -> list[RecordT]:
    """Return the records (or record ids) that make up ``unit``, from the full list sorted by id."""
    return list(records[unit * UNIT_RECORDS : (unit + 1) * UNIT_RECORDS])


def unit_stem(unit: int) -> str:
    return f"unit-{unit:05d}"


def shard_file_name(unit: int) -> str:
    return f"{SHARDS_DIR}/{unit_stem(unit)}.bin"


def unit_index_path(directory: Path, unit: int) -> Path:
    return directory / SHARDS_DIR / f"{unit_stem(unit)}.idx.json"


def unit_rejects_path(directory: Path, unit: int) -> Path:
    return directory / SHARDS_DIR / f"{unit_stem(unit)}.rejects.jsonl"


def unit_is_complete(directory: Path, unit: int) -> bool:
    return unit_index_path(directory, unit).is_file()


def hidden_to_bytes(hidden: torch.Tensor, hidden_dtype: str) -> np.ndarray:
    """Convert a hidden-state tensor to the on-disk representation (bf16 bits as uint16, or float32)."""
    if hidden_dtype == "bfloat16":
        return hidden.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view("<u2")
    if hidden_dtype == "float32":
        return hidden.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4", copy=False)
    raise ValueError(f"hidden_dtype {hidden_dtype!r} is not supported; use one of {sorted(HIDDEN_DTYPES)}")


def hidden_from_bytes(raw: np.ndarray, hidden_dtype: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a uint8 byte view into a new float32 array of ``shape`` (bf16 widens exactly)."""
    if hidden_dtype == "bfloat16":
        bits = raw.view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if hidden_dtype == "float32":
        return raw.view("<f4").astype(np.float32).reshape(shape)
    raise CacheFormatError(f"hidden_dtype {hidden_dtype!r} is not supported; expected one of {sorted(HIDDEN_DTYPES)}")


class UnitWriter:
    """Write one unit: its shard, then its rejects file, then its index (which marks it complete).

    Every record of the unit must be passed exactly once, either to
    ``add_sample`` or to ``add_reject``, in any order. ``commit`` checks that
    and publishes the unit. Used as a context manager, an exception deletes
    the partial shard and leaves no index, so the unit is redone on resume.
    """

    def __init__(
        self,
        directory: Path,
        unit: int,
        record_ids: Sequence[str],
        layout: Layout,
        writer_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.unit = unit
        self.record_ids = list(record_ids)
        self.layout = layout
        self.writer_info = dict(writer_info or {})
        self._pending = set(self.record_ids)
        if len(self._pending) != len(self.record_ids):
            raise ValueError(f"unit {unit} lists a record id more than once")
        self._samples: dict[str, dict[str, Any]] = {}
        self._rejects: list[str] = []
        self._rejected: Counter[str] = Counter()
        self._digest = hashlib.sha256()
        self._offset = 0
        self.shard_path = self.directory / shard_file_name(unit)
        self.shard_path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed temporary name: a rerun of this unit truncates the leftovers of a killed run.
        self._tmp_path = self.shard_path.with_name(self.shard_path.name + ".tmp")
        self._handle = open(self._tmp_path, "wb")

    def _claim(self, record_id: str) -> None:
        if record_id not in self._pending:
            state = "already written" if record_id in self.record_ids else "not part of this unit"
            raise ValueError(f"record {record_id!r} is {state} (unit {self.unit})")
        self._pending.discard(record_id)

    def _write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self._handle.write(data)
        self._digest.update(data)
        self._offset += data.nbytes

    def add_sample(
        self,
        record_id: str,
        input_ids: Sequence[int] | np.ndarray | torch.Tensor,
        loss_mask: Sequence[int] | np.ndarray | torch.Tensor,
        target_hidden: torch.Tensor,
        last_hidden: torch.Tensor,
    ) -> None:
        """Append one sample; ``target_hidden`` is [S, L*H] and ``last_hidden`` [S, H]."""
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        mask = np.asarray(loss_mask.cpu() if isinstance(loss_mask, torch.Tensor) else loss_mask, dtype=np.int64)
        seq_len = int(ids.shape[0])
        layout = self.layout
        expected_hidden = (seq_len, layout.num_layers * layout.hidden_size)
        if ids.ndim != 1 or seq_len == 0:
            raise ValueError(f"record {record_id!r}: input_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"record {record_id!r}: loss_mask must be 0/1 with shape {ids.shape}, got {mask.shape}")
        if tuple(target_hidden.shape) != expected_hidden:
            raise ValueError(
                f"record {record_id!r}: target_hidden shape {tuple(target_hidden.shape)} != {expected_hidden}"
            )
        if tuple(last_hidden.shape) != (seq_len, layout.hidden_size):
            raise ValueError(
                f"record {record_id!r}: last_hidden shape {tuple(last_hidden.shape)} != {(seq_len, layout.hidden_size)}"
            )
        if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
            raise ValueError(f"record {record_id!r}: token ids must fit in int32")
        self._claim(record_id)

        offset = self._offset
        self._write(ids.astype("<i4"))
        self._write(mask.astype(np.uint8))
        self._write(hidden_to_bytes(target_hidden, layout.hidden_dtype))
        self._write(hidden_to_bytes(last_hidden, layout.hidden_dtype))
        if self._offset - offset != layout.sample_bytes(seq_len):
            expected = layout.sample_bytes(seq_len)
            raise RuntimeError(
                f"record {record_id!r}: wrote {self._offset - offset} bytes, the layout expects {expected}"
            )
        self._samples[record_id] = {
            "id": record_id,
            "offset": offset,
            "seq_len": seq_len,
            "loss_tokens": int(mask.sum()),
        }

    def add_reject(self, record_id: str, reason: str, detail: str = "", record: Any = None) -> None:
        self._claim(record_id)
        self._rejected[reason] += 1
        entry = {"reason": reason, "id": record_id, "detail": detail, "record": record}
        self._rejects.append(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def commit(self, elapsed_s: float = 0.0) -> dict[str, Any]:
        """Publish the unit (shard, rejects, then index) and return its index; ``elapsed_s`` is recorded."""
        if self._pending:
            missing = sorted(self._pending)[:5]
            raise RuntimeError(
                f"unit {self.unit}: {len(self._pending)} record(s) were neither written nor rejected: {missing}"
            )
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp_path, self.shard_path)
        fsync_dir(self.shard_path.parent)

        rejects_path = unit_rejects_path(self.directory, self.unit)
        if self._rejects:
            atomic_write_text(rejects_path, "".join(self._rejects))
        else:
            rejects_path.unlink(missing_ok=True)

        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "unit": self.unit,
            "shard": self.shard_path.name,
            "shard_bytes": self._offset,
            "shard_sha256": self._digest.hexdigest(),
            "layout": self.layout.to_dict(),
            "records": self.record_ids,
            "samples": [self._samples[record_id] for record_id in self.record_ids if record_id in self._samples],
            "rejected": dict(sorted(self._rejected.items())),
            "writer": self.writer_info,
            "elapsed_s": round(elapsed_s, 3),
        }
        atomic_write_json(unit_index_path(self.directory, self.unit), index)
        return index

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        if exc_type is not None:
            self.abort()


def read_unit_index(directory: Path, unit: int) -> dict[str, Any]:
    path = unit_index_path(directory, unit)
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise CacheFormatError(
            f"{path} has format {index.get('format')!r} version {index.get('version')!r}, expected "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}; delete the cache output and rebuild it"
        )
    return index


def load_unit_indices(directory: Path, count: int) -> list[dict[str, Any]]:
    """Read the indices of units ``0..count-1``; fail naming every unit that is not finished."""
    missing = [unit for unit in range(count) if not unit_is_complete(directory, unit)]
    if missing:
        shown = ", ".join(str(unit) for unit in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise CacheFormatError(
            f"{len(missing)} of {count} cache units are not finished (units {shown}) in {directory}; "
            "run the cache stage again: it resumes and builds only the missing units"
        )
    return [read_unit_index(directory, unit) for unit in range(count)]


def write_cache_files(directory: Path, units: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge finished unit indices into ``index.bin``, ``record_ids.json``, ``rejects.jsonl`` and ``cache_info.json``.

    Returns the cache info. Raises CacheFormatError when units disagree on
    the layout or a shard's size differs from its unit index.
    """
    if not units:
        raise CacheFormatError(f"no units to merge in {directory}")
    layout = Layout.from_dict(units[0]["layout"])
    entries: list[tuple[int, int, int, int]] = []
    record_ids: list[str] = []
    rejects: list[str] = []
    rejected: Counter[str] = Counter()
    shards: list[dict[str, Any]] = []
    for position, unit in enumerate(units):
        number = int(unit["unit"])
        if number != position:
            raise CacheFormatError(f"unit index {position} in {directory} records unit number {number}")
        if Layout.from_dict(unit["layout"]) != layout:
            raise CacheFormatError(
                f"unit {number} was written with layout {unit['layout']}, unit 0 with {layout.to_dict()}; "
                "delete the cache output and rebuild it with one config"
            )
        shard_path = directory / shard_file_name(number)
        size = shard_path.stat().st_size if shard_path.is_file() else None
        if size != unit["shard_bytes"]:
            raise CacheFormatError(
                f"shard {shard_path} has {size} bytes, its unit index records {unit['shard_bytes']}; "
                f"delete {unit_index_path(directory, number)} and rerun the cache stage to rebuild that unit"
            )
        for sample in unit["samples"]:
            entries.append((number, int(sample["seq_len"]), int(sample["loss_tokens"]), int(sample["offset"])))
            record_ids.append(str(sample["id"]))
        rejected.update(unit["rejected"])
        if unit["rejected"]:
            rejects.append(unit_rejects_path(directory, number).read_text(encoding="utf-8"))
        shards.append(
            {
                "shard_id": number,
                "file_name": shard_file_name(number),
                "bytes": int(unit["shard_bytes"]),
                "sha256": unit["shard_sha256"],
                "num_samples": len(unit["samples"]),
            }
        )

    index = np.zeros(len(entries), dtype=INDEX_DTYPE)
    if entries:
        columns = np.array(entries, dtype=np.uint64)
        index["shard"] = columns[:, 0]
        index["seq_len"] = columns[:, 1]
        index["loss_tokens"] = columns[:, 2]
        index["offset"] = columns[:, 3]
    atomic_write_bytes(directory / INDEX_NAME, index.tobytes())
    atomic_write_text(directory / RECORD_IDS_NAME, json.dumps(record_ids, ensure_ascii=False) + "\n")
    atomic_write_text(directory / REJECTS_NAME, "".join(rejects))
    for leftover in (directory / SHARDS_DIR).glob("*.tmp"):
        leftover.unlink()

    total_tokens = int(index["seq_len"].sum())
    info: dict[str, Any] = dict(extra)
    info.update(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "unit_records": UNIT_RECORDS,
            "num_units": len(units),
            "num_records": sum(len(unit["records"]) for unit in units),
            "num_samples": len(entries),
            "num_shards": len(shards),
            "layer_ids": list(layout.layer_ids),
            "num_layers": layout.num_layers,
            "hidden_size": layout.hidden_size,
            "hidden_dtype": layout.hidden_dtype,
            "token_dtype": TOKEN_DTYPE,
            "mask_dtype": MASK_DTYPE,
            "index_record_size": INDEX_DTYPE.itemsize,
            "layer_semantics": LAYER_SEMANTICS,
            "total_tokens": total_tokens,
            "supervised_tokens": int(index["loss_tokens"].sum()),
            "bytes_per_token": layout.bytes_per_token,
            "data_bytes": sum(shard["bytes"] for shard in shards),
            "rejected": dict(sorted(rejected.items())),
            "shards": shards,
        }
    )
    atomic_write_json(directory / CACHE_INFO_NAME, info)
    return info

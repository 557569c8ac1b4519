"""Random access to a finished target cache, and the batch collate function for training."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepspec.cache.format import (
    CACHE_INFO_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    HIDDEN_DTYPES,
    INDEX_DTYPE,
    INDEX_NAME,
    MASK_DTYPE,
    RECORD_IDS_NAME,
    TOKEN_DTYPE,
    CacheFormatError,
    Layout,
    hidden_from_bytes,
)
from deepspec.manifest import MANIFEST_NAME, read_manifest, sha256_file

REQUIRED_INFO_KEYS = (
    "format",
    "version",
    "num_samples",
    "num_shards",
    "layer_ids",
    "hidden_size",
    "hidden_dtype",
    "token_dtype",
    "mask_dtype",
    "index_record_size",
    "shards",
)


def _validate_info(info: dict[str, Any], directory: Path) -> Layout:
    """Check the cache metadata against this reader's format and the files on disk; return the layout."""
    where = directory / CACHE_INFO_NAME
    missing = [key for key in REQUIRED_INFO_KEYS if key not in info]
    if missing:
        raise CacheFormatError(f"{where} is missing required fields {missing}; rebuild the cache with `deepspec cache`")
    if info["format"] != FORMAT_NAME or info["version"] != FORMAT_VERSION:
        raise CacheFormatError(
            f"{where} is format {info['format']!r} version {info['version']!r}; this reader reads "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}. Rebuild the cache with this deepspec version."
        )
    expected = {"token_dtype": TOKEN_DTYPE, "mask_dtype": MASK_DTYPE, "index_record_size": INDEX_DTYPE.itemsize}
    for key, value in expected.items():
        if info[key] != value:
            raise CacheFormatError(f"{where}: {key} is {info[key]!r}, expected {value!r}")
    if info["hidden_dtype"] not in HIDDEN_DTYPES:
        raise CacheFormatError(
            f"{where}: hidden_dtype {info['hidden_dtype']!r} is not supported; expected one of {sorted(HIDDEN_DTYPES)}"
        )
    layer_ids = info["layer_ids"]
    if (
        not isinstance(layer_ids, list)
        or not layer_ids
        or not all(isinstance(i, int) for i in layer_ids)
        or sorted(set(layer_ids)) != layer_ids
    ):
        raise CacheFormatError(f"{where}: layer_ids must be a non-empty increasing list of ints, got {layer_ids!r}")
    if not isinstance(info["hidden_size"], int) or info["hidden_size"] <= 0:
        raise CacheFormatError(f"{where}: hidden_size must be a positive int, got {info['hidden_size']!r}")

    shards = info["shards"]
    if info["num_shards"] != len(shards):
        raise CacheFormatError(f"{where}: num_shards is {info['num_shards']} but {len(shards)} shards are listed")
    for position, shard in enumerate(shards):
        if shard.get("shard_id") != position:
            raise CacheFormatError(f"{where}: shard entry {position} has shard_id {shard.get('shard_id')!r}")
        path = directory / shard["file_name"]
        if not path.is_file():
            raise CacheFormatError(f"shard file {path} is missing; restore it or rebuild the cache")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise CacheFormatError(
                f"shard file {path} has {size} bytes, {where} records {shard['bytes']}; the file is truncated or "
                "was replaced. Rebuild the cache."
            )
    return Layout(tuple(layer_ids), info["hidden_size"], info["hidden_dtype"])


def _load_index(directory: Path, info: dict[str, Any], layout: Layout) -> np.ndarray:
    path = directory / INDEX_NAME
    if not path.is_file():
        raise CacheFormatError(f"index file {path} is missing; run `deepspec cache --finalize` or rebuild the cache")
    expected = info["num_samples"] * INDEX_DTYPE.itemsize
    if path.stat().st_size != expected:
        raise CacheFormatError(
            f"index file {path} has {path.stat().st_size} bytes, expected {expected} "
            f"({info['num_samples']} samples x {INDEX_DTYPE.itemsize} bytes); rebuild the cache"
        )
    index = np.fromfile(path, dtype=INDEX_DTYPE)
    if len(index) == 0:
        return index
    num_shards = info["num_shards"]
    if int(index["shard"].max()) >= num_shards:
        raise CacheFormatError(
            f"index file {path} refers to shard {int(index['shard'].max())}, but the cache has {num_shards} shards; "
            "rebuild the cache"
        )
    if int(index["seq_len"].min()) == 0:
        raise CacheFormatError(f"index file {path} contains a sample of length 0; rebuild the cache")
    shard_bytes = np.array([shard["bytes"] for shard in info["shards"]], dtype=np.uint64)
    ends = index["offset"] + index["seq_len"].astype(np.uint64) * np.uint64(layout.bytes_per_token)
    beyond = np.nonzero(ends > shard_bytes[index["shard"]])[0]
    if len(beyond):
        raise CacheFormatError(
            f"index file {path}: sample {int(beyond[0])} extends past the end of its shard; rebuild the cache"
        )
    return index


class CacheReader:
    """A finished target cache, indexed by sample number.

    Shards are memory-mapped on first use and at most ``max_open_shards`` stay
    open (least recently used are closed first). Samples are copied out of the
    maps, so a returned tensor never pins a shard. Pickling drops the open
    maps, so DataLoader workers reopen them lazily.
    """

    def __init__(self, directory: str | Path, *, max_open_shards: int = 4) -> None:
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be at least 1, got {max_open_shards}")
        self.directory = Path(directory)
        self.max_open_shards = max_open_shards
        if read_manifest(self.directory) is None:
            raise CacheFormatError(
                f"no finished cache at {self.directory} ({MANIFEST_NAME} is missing); run `deepspec cache` "
                "(or `deepspec cache --finalize` when every unit is built)"
            )
        info_path = self.directory / CACHE_INFO_NAME
        if not info_path.is_file():
            raise CacheFormatError(f"{info_path} is missing; rebuild the cache with `deepspec cache`")
        self.info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
        self.layout = _validate_info(self.info, self.directory)
        self._index = _load_index(self.directory, self.info, self.layout)
        self._shard_files = [self.directory / shard["file_name"] for shard in self.info["shards"]]
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._record_ids: list[str] | None = None

    @property
    def layer_ids(self) -> list[int]:
        return list(self.layout.layer_ids)

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def hidden_dtype(self) -> str:
        return self.layout.hidden_dtype

    @property
    def seq_lens(self) -> np.ndarray:
        """Token count of every sample (int64 [N])."""
        return self._index["seq_len"].astype(np.int64)

    @property
    def loss_tokens(self) -> np.ndarray:
        """Supervised-token count of every sample (int64 [N])."""
        return self._index["loss_tokens"].astype(np.int64)

    @property
    def record_ids(self) -> list[str]:
        """Source record id of every sample, in sample order."""
        if self._record_ids is None:
            path = self.directory / RECORD_IDS_NAME
            ids = json.loads(path.read_text(encoding="utf-8"))
            if len(ids) != len(self):
                raise CacheFormatError(f"{path} lists {len(ids)} record ids for {len(self)} samples; rebuild the cache")
            self._record_ids = [str(record_id) for record_id in ids]
        return self._record_ids

    def check_compatible(self, layer_ids: Sequence[int], hidden_size: int) -> None:
        """Raise ValueError unless the cache was built with these layer ids and this hidden size."""
        problems = []
        if list(layer_ids) != self.layer_ids:
            problems.append(f"layer ids {self.layer_ids} in the cache, {list(layer_ids)} expected")
        if hidden_size != self.hidden_size:
            problems.append(f"hidden size {self.hidden_size} in the cache, {hidden_size} expected")
        if problems:
            raise ValueError(
                f"the cache at {self.directory} does not match the draft: {'; '.join(problems)}. "
                "Set cache.layer_ids to the draft's target layers and rebuild the cache, or use a matching target."
            )

    def verify_checksums(self) -> None:
        """Recompute every shard's sha256 and raise CacheFormatError on the first mismatch."""
        for shard, path in zip(self.info["shards"], self._shard_files, strict=True):
            actual = sha256_file(path)
            if actual != shard["sha256"]:
                raise CacheFormatError(
                    f"shard file {path} has sha256 {actual}, {CACHE_INFO_NAME} records {shard['sha256']}; "
                    "the file is corrupted. Rebuild the cache."
                )

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, shard_id: int) -> np.ndarray:
        mapped = self._open.get(shard_id)
        if mapped is not None:
            self._open.move_to_end(shard_id)
            return mapped
        # A plain ndarray view of the map: slices and dtype views then stay ordinary arrays.
        mapped = np.asarray(np.memmap(self._shard_files[shard_id], dtype=np.uint8, mode="r"))
        self._open[shard_id] = mapped
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return mapped

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        """Return one sample: input_ids int64 [S], loss_mask uint8 [S], target_hidden and target_last_hidden float32."""
        count = len(self)
        if not -count <= position < count:
            raise IndexError(f"sample {position} is out of range for a cache of {count} samples")
        entry = self._index[position]
        seq_len = int(entry["seq_len"])
        start = int(entry["offset"])
        layout = self.layout
        raw = self._shard(int(entry["shard"]))[start : start + layout.sample_bytes(seq_len)]
        ids_at, mask_at, hidden_at, last_at = layout.field_offsets(seq_len)
        width = layout.num_layers * layout.hidden_size
        return {
            "input_ids": torch.from_numpy(raw[ids_at:mask_at].view("<i4").astype(np.int64)),
            "loss_mask": torch.from_numpy(np.array(raw[mask_at:hidden_at], dtype=np.uint8)),
            "target_hidden": torch.from_numpy(
                hidden_from_bytes(raw[hidden_at:last_at], layout.hidden_dtype, (seq_len, width))
            ),
            "target_last_hidden": torch.from_numpy(
                hidden_from_bytes(raw[last_at:], layout.hidden_dtype, (seq_len, layout.hidden_size))
            ),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad samples to the longest one with zeros; ``attention_mask`` (int64) is 1 on real tokens."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [int(sample["input_ids"].shape[0]) for sample in samples]
    batch, longest = len(samples), max(lengths)
    first = samples[0]
    input_ids = torch.zeros(batch, longest, dtype=torch.int64)
    loss_mask = torch.zeros(batch, longest, dtype=first["loss_mask"].dtype)
    attention_mask = torch.zeros(batch, longest, dtype=torch.int64)
    target_hidden = torch.zeros(batch, longest, first["target_hidden"].shape[-1], dtype=first["target_hidden"].dtype)
    last_hidden = torch.zeros(
        batch, longest, first["target_last_hidden"].shape[-1], dtype=first["target_last_hidden"].dtype
    )
    for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
        input_ids[row, :length] = sample["input_ids"]
        loss_mask[row, :length] = sample["loss_mask"]
        attention_mask[row, :length] = 1
        target_hidden[row, :length] = sample["target_hidden"]
        last_hidden[row, :length] = sample["target_last_hidden"]
    return {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "target_hidden": target_hidden,
        "target_last_hidden": last_hidden,
    }

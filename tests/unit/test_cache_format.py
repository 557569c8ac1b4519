from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepspec.cache.format import (
    CACHE_INFO_NAME,
    INDEX_DTYPE,
    INDEX_NAME,
    REJECTS_NAME,
    UNIT_RECORDS,
    CacheFormatError,
    Layout,
    UnitWriter,
    load_unit_indices,
    num_units,
    shard_file_name,
    unit_index_path,
    unit_is_complete,
    unit_records,
    write_cache_files,
)
from deepspec.cache.reader import CacheReader, collate
from deepspec.manifest import write_manifest

HIDDEN = 8
LAYERS = (0, 2)


def _sample(seed: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 50_000, (length,), generator=generator),
        "loss_mask": (torch.rand(length, generator=generator) > 0.5).to(torch.int64),
        "target_hidden": torch.randn(length, len(LAYERS) * HIDDEN, generator=generator) * 3,
        "target_last_hidden": torch.randn(length, HIDDEN, generator=generator),
    }


def _build_cache(
    directory: Path, hidden_dtype: str, records: int = 5, rejected: tuple[str, ...] = ("r1",)
) -> dict[str, dict[str, torch.Tensor]]:
    """Write a finished cache of ``records`` records (two units of at most 3) and return the kept samples by id."""
    layout = Layout(LAYERS, HIDDEN, hidden_dtype)
    ids = [f"r{i}" for i in range(records)]
    kept: dict[str, dict[str, torch.Tensor]] = {}
    units = []
    for unit, start in enumerate(range(0, records, 3)):
        unit_ids = ids[start : start + 3]
        with UnitWriter(directory, unit, unit_ids, layout, {"note": "test"}) as writer:
            # Written in reverse: the index must still list samples in record order.
            for record_id in reversed(unit_ids):
                if record_id in rejected:
                    writer.add_reject(record_id, "too_long", "600 tokens > max_length=512", {"id": record_id})
                    continue
                sample = _sample(int(record_id[1:]), length=3 + int(record_id[1:]))
                kept[record_id] = sample
                writer.add_sample(record_id, **_writer_args(sample))
            units.append(writer.commit())
    write_cache_files(directory, units, {"max_length": 512})
    write_manifest(directory, stage="cache", stage_fingerprint="test", settings={}, inputs={}, counts={})
    return kept


def _writer_args(sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "input_ids": sample["input_ids"],
        "loss_mask": sample["loss_mask"],
        "target_hidden": sample["target_hidden"],
        "last_hidden": sample["target_last_hidden"],
    }


@pytest.mark.parametrize("hidden_dtype", ["bfloat16", "float32"])
def test_round_trip_exact_bits(tmp_path: Path, hidden_dtype: str) -> None:
    kept = _build_cache(tmp_path, hidden_dtype)
    reader = CacheReader(tmp_path)
    storage = torch.bfloat16 if hidden_dtype == "bfloat16" else torch.float32

    assert len(reader) == 4
    assert reader.record_ids == ["r0", "r2", "r3", "r4"]
    assert reader.layer_ids == list(LAYERS)
    assert reader.hidden_size == HIDDEN
    assert reader.seq_lens.tolist() == [3, 5, 6, 7]
    for position, record_id in enumerate(reader.record_ids):
        got = reader[position]
        want = kept[record_id]
        assert got["input_ids"].dtype == torch.int64
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["loss_mask"].to(torch.int64), want["loss_mask"])
        assert reader.loss_tokens[position] == int(want["loss_mask"].sum())
        for key in ("target_hidden", "target_last_hidden"):
            assert got[key].dtype == torch.float32
            expected = want[key].to(storage).to(torch.float32)
            assert torch.equal(got[key].view(torch.int32), expected.view(torch.int32)), key


def test_bytes_per_token_and_info(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    info = json.loads((tmp_path / CACHE_INFO_NAME).read_text())
    # 4 (id) + 1 (mask) + (2 layers + last) * 8 * 2 bytes
    assert info["bytes_per_token"] == 4 + 1 + 3 * HIDDEN * 2
    assert info["total_tokens"] == 3 + 5 + 6 + 7
    assert info["data_bytes"] == info["total_tokens"] * info["bytes_per_token"]
    assert info["num_samples"] == 4
    assert info["num_records"] == 5
    assert info["rejected"] == {"too_long": 1}
    assert info["unit_records"] == UNIT_RECORDS
    assert info["max_length"] == 512
    assert [shard["num_samples"] for shard in info["shards"]] == [2, 2]
    assert (tmp_path / INDEX_NAME).stat().st_size == 4 * INDEX_DTYPE.itemsize
    rejects = [json.loads(line) for line in (tmp_path / REJECTS_NAME).read_text().splitlines()]
    assert [(entry["id"], entry["reason"]) for entry in rejects] == [("r1", "too_long")]


def test_collate_pads_right_with_zeros(tmp_path: Path) -> None:
    _build_cache(tmp_path, "float32")
    reader = CacheReader(tmp_path)
    batch = collate([reader[0], reader[3]])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["target_hidden"].shape == (2, 7, len(LAYERS) * HIDDEN)
    assert batch["target_last_hidden"].shape == (2, 7, HIDDEN)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert torch.equal(batch["input_ids"][0, :3], reader[0]["input_ids"])
    assert batch["input_ids"][0, 3:].eq(0).all()
    assert batch["loss_mask"][0, 3:].eq(0).all()
    assert batch["target_hidden"][0, 3:].eq(0).all()
    assert batch["target_last_hidden"][0, 3:].eq(0).all()
    assert torch.equal(batch["target_hidden"][1], reader[3]["target_hidden"])
    with pytest.raises(ValueError, match="at least one sample"):
        collate([])


def test_reader_pickles_and_limits_open_shards(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    reader = CacheReader(tmp_path, max_open_shards=1)
    first = reader[0]
    last = reader[3]
    assert len(reader._open) == 1
    clone = pickle.loads(pickle.dumps(reader))
    assert len(clone._open) == 0
    assert torch.equal(clone[0]["target_hidden"], first["target_hidden"])
    assert torch.equal(clone[3]["target_last_hidden"], last["target_last_hidden"])
    assert torch.equal(reader[-1]["input_ids"], last["input_ids"])
    with pytest.raises(IndexError, match="sample 4 is out of range"):
        reader[4]


def test_check_compatible_names_both_values(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    reader = CacheReader(tmp_path)
    reader.check_compatible(list(LAYERS), HIDDEN)
    with pytest.raises(ValueError, match=r"layer ids \[0, 2\] in the cache, \[1, 2\] expected"):
        reader.check_compatible([1, 2], HIDDEN)
    with pytest.raises(ValueError, match="hidden size 8 in the cache, 16 expected"):
        reader.check_compatible(list(LAYERS), 16)


def _edit_info(directory: Path, **changes: Any) -> None:
    path = directory / CACHE_INFO_NAME
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


def test_reader_rejects_unfinished_cache(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    (tmp_path / "_MANIFEST.json").unlink()
    with pytest.raises(CacheFormatError, match="no finished cache .*_MANIFEST.json is missing"):
        CacheReader(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 99}, "version 99; this reader reads"),
        ({"hidden_dtype": "float8"}, "hidden_dtype 'float8' is not supported"),
        ({"token_dtype": "int64"}, "token_dtype is 'int64', expected 'int32'"),
        ({"layer_ids": [2, 0]}, "layer_ids must be a non-empty increasing list"),
        ({"layer_ids": []}, "layer_ids must be a non-empty increasing list"),
        ({"hidden_size": 0}, "hidden_size must be a positive int"),
        ({"num_shards": 3}, "num_shards is 3 but 2 shards are listed"),
        ({"num_samples": 5}, "index file .* has 96 bytes, expected 120"),
    ],
)
def test_reader_rejects_bad_info(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    _build_cache(tmp_path, "bfloat16")
    _edit_info(tmp_path, **changes)
    with pytest.raises(CacheFormatError, match=message):
        CacheReader(tmp_path)


def test_reader_rejects_missing_field(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    info = json.loads((tmp_path / CACHE_INFO_NAME).read_text())
    del info["hidden_size"]
    (tmp_path / CACHE_INFO_NAME).write_text(json.dumps(info))
    with pytest.raises(CacheFormatError, match=r"is missing required fields \['hidden_size'\]"):
        CacheReader(tmp_path)


def test_reader_rejects_missing_and_truncated_shards(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    shard = tmp_path / shard_file_name(1)
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(CacheFormatError, match=f"shard file .*unit-00001.bin has {len(data) - 1} bytes"):
        CacheReader(tmp_path)
    shard.unlink()
    with pytest.raises(CacheFormatError, match="shard file .*unit-00001.bin is missing"):
        CacheReader(tmp_path)


def test_verify_checksums_detects_corruption(tmp_path: Path) -> None:
    _build_cache(tmp_path, "bfloat16")
    CacheReader(tmp_path).verify_checksums()
    shard = tmp_path / shard_file_name(0)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match="unit-00000.bin has sha256 .* the file is corrupted"):
        CacheReader(tmp_path).verify_checksums()


def test_unit_writer_requires_every_record(tmp_path: Path) -> None:
    layout = Layout(LAYERS, HIDDEN, "float32")
    writer = UnitWriter(tmp_path, 0, ["a", "b"], layout)
    writer.add_sample("a", **_writer_args(_sample(0, 4)))
    with pytest.raises(ValueError, match="record 'a' is already written"):
        writer.add_reject("a", "too_long")
    with pytest.raises(ValueError, match="record 'z' is not part of this unit"):
        writer.add_reject("z", "too_long")
    with pytest.raises(RuntimeError, match=r"1 record\(s\) were neither written nor rejected: \['b'\]"):
        writer.commit()
    writer.abort()
    assert not unit_is_complete(tmp_path, 0)


def test_unit_writer_checks_shapes(tmp_path: Path) -> None:
    layout = Layout(LAYERS, HIDDEN, "float32")
    sample = _sample(0, 4)
    with UnitWriter(tmp_path, 0, ["a"], layout) as writer:
        with pytest.raises(ValueError, match=r"target_hidden shape \(4, 8\) != \(4, 16\)"):
            writer.add_sample(
                "a",
                sample["input_ids"],
                sample["loss_mask"],
                sample["target_last_hidden"],
                sample["target_last_hidden"],
            )
        with pytest.raises(ValueError, match="loss_mask must be 0/1"):
            writer.add_sample(
                "a", sample["input_ids"], sample["input_ids"], sample["target_hidden"], sample["target_last_hidden"]
            )
        writer.add_sample("a", **_writer_args(sample))
        writer.commit()
    assert unit_is_complete(tmp_path, 0)


def test_failed_unit_leaves_no_index_or_shard(tmp_path: Path) -> None:
    layout = Layout(LAYERS, HIDDEN, "bfloat16")
    with pytest.raises(RuntimeError, match="simulated"):
        with UnitWriter(tmp_path, 0, ["a", "b"], layout) as writer:
            writer.add_sample("a", **_writer_args(_sample(0, 4)))
            raise RuntimeError("simulated failure")
    assert not unit_is_complete(tmp_path, 0)
    assert list((tmp_path / "shards").iterdir()) == []
    with pytest.raises(CacheFormatError, match=r"1 of 1 cache units are not finished \(units 0\)"):
        load_unit_indices(tmp_path, 1)


def test_merge_rejects_shard_size_mismatch(tmp_path: Path) -> None:
    layout = Layout(LAYERS, HIDDEN, "bfloat16")
    with UnitWriter(tmp_path, 0, ["a"], layout) as writer:
        writer.add_sample("a", **_writer_args(_sample(0, 4)))
        writer.commit()
    (tmp_path / shard_file_name(0)).write_bytes(b"short")
    with pytest.raises(
        CacheFormatError, match=r"has 5 bytes, its unit index records \d+; delete .*unit-00000.idx.json"
    ):
        write_cache_files(tmp_path, load_unit_indices(tmp_path, 1), {})


def test_merge_rejects_mixed_layouts(tmp_path: Path) -> None:
    for unit, dtype in enumerate(["bfloat16", "float32"]):
        with UnitWriter(tmp_path, unit, [f"r{unit}"], Layout(LAYERS, HIDDEN, dtype)) as writer:
            writer.add_sample(f"r{unit}", **_writer_args(_sample(unit, 3)))
            writer.commit()
    with pytest.raises(CacheFormatError, match="unit 1 was written with layout"):
        write_cache_files(tmp_path, load_unit_indices(tmp_path, 2), {})
    assert unit_index_path(tmp_path, 1).is_file()


def test_unit_planning() -> None:
    ids = [str(i) for i in range(UNIT_RECORDS * 2 + 1)]
    assert num_units(0) == 0
    assert num_units(len(ids)) == 3
    assert unit_records(ids, 1) == ids[UNIT_RECORDS : 2 * UNIT_RECORDS]
    assert unit_records(ids, 2) == [ids[-1]]


def test_layout_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="hidden_dtype 'float16' is not supported"):
        Layout((0,), 8, "float16")
    with pytest.raises(ValueError, match="layer_ids is empty"):
        Layout((), 8, "float32")
    assert np.array_equal(Layout((0,), 8, "float32").field_offsets(2), (0, 8, 10, 74))

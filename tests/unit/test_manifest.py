import json

import pytest

from deepspec.config import validate_config
from deepspec.manifest import (
    RejectLog,
    StageInputError,
    check_kept_fraction,
    fingerprint,
    read_manifest,
    require_upstream,
    write_manifest,
)
from deepspec.pipeline import stage_fingerprints, stage_settings


def config_with(**sections):
    return validate_config({"data": {"sources": [{"name": "gsm8k"}]}, **sections})


def test_fingerprint_depends_on_settings_and_inputs():
    base = fingerprint("cache", {"a": 1}, {"regen": "x"})
    assert base == fingerprint("cache", {"a": 1}, {"regen": "x"})
    assert base != fingerprint("cache", {"a": 2}, {"regen": "x"})
    assert base != fingerprint("cache", {"a": 1}, {"regen": "y"})


def test_downstream_change_keeps_upstream_fingerprints():
    one = stage_fingerprints(config_with(train={"lr": 0.1}))
    two = stage_fingerprints(config_with(train={"lr": 0.2}))
    assert one["cache"] == two["cache"]
    assert one["train"] != two["train"]
    assert one["eval"] != two["eval"]


def test_process_count_does_not_change_fingerprints():
    one = stage_fingerprints(config_with(cache={"nproc_per_node": 1}, train={"nproc_per_node": 1}))
    two = stage_fingerprints(config_with(cache={"nproc_per_node": 2}, train={"nproc_per_node": 2}))
    assert one == two


def test_upstream_change_changes_every_downstream_fingerprint():
    one = stage_fingerprints(config_with(regen={"max_new_tokens": 64}))
    two = stage_fingerprints(config_with(regen={"max_new_tokens": 32}))
    assert one["prompts"] == two["prompts"]
    for stage in ("regen", "cache", "train", "eval"):
        assert one[stage] != two[stage]


def test_output_without_manifest_does_not_exist(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x")
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, stage="s", stage_fingerprint="f", settings={}, inputs={}, counts={"out": 1})
    assert read_manifest(tmp_path)["counts"] == {"out": 1}


def test_require_upstream_names_the_differing_setting(tmp_path):
    old = config_with(storage={"root": str(tmp_path)}, regen={"max_new_tokens": 64})
    new = config_with(storage={"root": str(tmp_path)}, regen={"max_new_tokens": 32})
    old_fp = stage_fingerprints(old)["regen"]
    write_manifest(
        tmp_path / "regen" / old_fp,
        stage="regen",
        stage_fingerprint=old_fp,
        settings=stage_settings(old, "regen"),
        inputs={},
        counts={},
    )
    with pytest.raises(StageInputError) as error:
        require_upstream(tmp_path, "regen", stage_fingerprints(new)["regen"], stage_settings(new, "regen"))
    assert "regen.max_new_tokens: 64 there, 32 in this config" in str(error.value)


def test_reject_log_counts_and_writes_reasons(tmp_path):
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        rejects.add("too_long", record_id="a", detail="70 > 32")
        rejects.add("too_long", record_id="b")
        rejects.add("empty", record_id="c")
    assert dict(rejects.counts) == {"too_long": 2, "empty": 1}
    lines = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [line["reason"] for line in lines] == ["too_long", "too_long", "empty"]
    assert lines[0]["detail"] == "70 > 32"


def test_kept_fraction_below_threshold_fails_with_reasons():
    with pytest.raises(RuntimeError, match=r"kept 1/4 records .* regen.min_kept_fraction=0.5.*length=3"):
        check_kept_fraction("regen", 1, 4, 0.5, "regen.min_kept_fraction", {"length": 3})
    check_kept_fraction("regen", 2, 4, 0.5, "regen.min_kept_fraction", {"length": 2})

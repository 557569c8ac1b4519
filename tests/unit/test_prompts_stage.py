import json
import logging
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from deepspec.config import validate_config
from deepspec.data.records import split_of
from deepspec.data.stage import read_records, run_prompts
from deepspec.manifest import MANIFEST_NAME, read_manifest, sha256_file

SHARED_EVAL = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "eval"

GOOD_CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Count to three"}]}]},
    {"messages": [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": None}]},
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "And 3+3?"},
            {"from": "gpt", "value": "6"},
        ]
    },
    {"turns": ["Write a haiku", "Now another one"]},
]
BAD_CHAT_LINES = [
    '{"messages": [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}]}',
    '{"messages": [{"role": "assistant", "content": "Hello"}]}',
    '{"messages": [{"role": "user", "content": "broken"',
    '["not", "an", "object"]',
]


def write_chat_file(path, rows=GOOD_CHAT_ROWS, bad_lines=BAD_CHAT_LINES, seed=None):
    lines = [json.dumps(row) for row in rows] + list(bad_lines)
    if seed is not None:
        random.Random(seed).shuffle(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_benchmark_files(data_dir):
    # The same question as a chat row, with another answer: a duplicate id.
    benchmark_rows = [{"turns": ["Say hi"]}, {"turns": ["Translate 'cat' to French"]}]
    (data_dir / "mini-bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in benchmark_rows))
    table = pa.table({"turns": [["Summarise this text"], ["List three fruits"], ["Explain rain"]]})
    pq.write_table(table, data_dir / "extra.parquet")


def make_config(root, data_dir, **data):
    raw = {
        "data": {
            "data_dir": str(data_dir),
            "sources": [
                {"name": "chat", "path": "chat.jsonl"},
                {"name": "mini-bench"},
                {"name": "extra", "path": "extra.parquet"},
            ],
            "heldout_fraction": 0.3,
            "min_kept_fraction": 0.5,
            **data,
        },
        "storage": {"root": str(root)},
    }
    return validate_config(raw)


@pytest.fixture()
def data_dir(tmp_path):
    folder = tmp_path / "data"
    write_chat_file(folder / "chat.jsonl")
    write_benchmark_files(folder)
    return folder


def all_records(output):
    return read_records(output / "train.jsonl") + read_records(output / "heldout.jsonl")


def test_stage_writes_split_records(tmp_path, data_dir):
    config = make_config(tmp_path / "runs", data_dir)
    output = run_prompts(config)
    train = read_records(output / "train.jsonl")
    heldout = read_records(output / "heldout.jsonl")
    records = train + heldout

    assert len(records) == 5 + 1 + 3
    assert len({record["id"] for record in records}) == len(records)
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)
    assert [r["id"] for r in heldout] == sorted(r["id"] for r in heldout)
    for record in records:
        assert set(record) == {"id", "source", "messages", "split"}
        assert record["split"] == split_of(record["id"], 0.3, config.data.split_salt)
    assert {record["split"] for record in train} <= {"train"}
    assert {record["split"] for record in heldout} <= {"heldout"}


def test_stage_keeps_canonical_messages(tmp_path, data_dir):
    output = run_prompts(make_config(tmp_path / "runs", data_dir))
    by_first_user = {record["messages"][0]["content"]: record for record in all_records(output)}

    assert by_first_user["Say hi"]["source"] == "chat"
    assert by_first_user["Say hi"]["messages"][1] == {"role": "assistant", "content": "Hi!"}
    assert by_first_user["Count to three"]["messages"][1] == {"role": "assistant", "content": None}
    haiku = by_first_user["Write a haiku"]["messages"]
    assert [m["role"] for m in haiku] == ["user", "assistant", "user", "assistant"]
    assert by_first_user["Be brief."]["messages"][0]["role"] == "system"
    assert by_first_user["Explain rain"]["source"] == "extra"


def test_stage_logs_rejects_by_reason(tmp_path, data_dir):
    output = run_prompts(make_config(tmp_path / "runs", data_dir))
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(entry["reason"] for entry in rejects)
    assert reasons == sorted(
        ["consecutive_user_turns", "starts_with_assistant", "invalid_json", "not_an_object", "duplicate"]
    )
    invalid = next(entry for entry in rejects if entry["reason"] == "invalid_json")
    assert "chat.jsonl:8" in invalid["detail"]
    duplicate = next(entry for entry in rejects if entry["reason"] == "duplicate")
    assert duplicate["record"] == {"turns": ["Say hi"]}


def test_manifest_counts_and_checksums(tmp_path, data_dir):
    config = make_config(tmp_path / "runs", data_dir)
    output = run_prompts(config)
    manifest = read_manifest(output)

    assert manifest["stage"] == "prompts"
    assert manifest["fingerprint"] == output.name
    assert manifest["counts"]["rows"] == 9 + 2 + 3
    assert manifest["counts"]["kept"] == 9
    assert manifest["counts"]["train"] + manifest["counts"]["heldout"] == 9
    assert manifest["rejected"] == {
        "consecutive_user_turns": 1,
        "starts_with_assistant": 1,
        "invalid_json": 1,
        "not_an_object": 1,
        "duplicate": 1,
    }
    for name in ("train.jsonl", "heldout.jsonl", "rejects.jsonl", "config.yaml"):
        assert manifest["files"][name]["sha256"] == sha256_file(output / name)
        assert manifest["files"][name]["bytes"] == (output / name).stat().st_size

    chat = manifest["sources"]["chat"]
    assert chat["rows"] == 9
    assert chat["kept"] == 5
    assert chat["rejected"] == {
        "consecutive_user_turns": 1,
        "starts_with_assistant": 1,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    assert chat["origin"]["sha256"] == sha256_file(data_dir / "chat.jsonl")
    assert manifest["sources"]["mini-bench"]["rejected"] == {"duplicate": 1}
    assert sum(entry["train"] for entry in manifest["sources"].values()) == manifest["counts"]["train"]
    assert sum(entry["heldout"] for entry in manifest["sources"].values()) == manifest["counts"]["heldout"]
    assert set(manifest["timings_s"]) == {"read", "write", "total"}


def test_resolved_config_written(tmp_path, data_dir):
    config = make_config(tmp_path / "runs", data_dir)
    output = run_prompts(config)
    assert yaml.safe_load((output / "config.yaml").read_text()) == config.model_dump(mode="json")


def test_rerun_is_up_to_date(tmp_path, data_dir, caplog):
    config = make_config(tmp_path / "runs", data_dir)
    output = run_prompts(config)
    before = (output / MANIFEST_NAME).read_bytes()
    (data_dir / "chat.jsonl").write_text("")

    with caplog.at_level(logging.INFO, logger="deepspec.data.stage"):
        again = run_prompts(config)

    assert again == output
    assert (output / MANIFEST_NAME).read_bytes() == before
    assert "up to date" in caplog.text


def test_output_independent_of_row_order(tmp_path):
    outputs = []
    for seed in (1, 2):
        folder = tmp_path / f"data-{seed}"
        write_chat_file(folder / "chat.jsonl", seed=seed)
        write_benchmark_files(folder)
        outputs.append(run_prompts(make_config(tmp_path / f"runs-{seed}", folder)))
    first, second = outputs
    assert first.name == second.name
    assert (first / "train.jsonl").read_bytes() == (second / "train.jsonl").read_bytes()
    assert (first / "heldout.jsonl").read_bytes() == (second / "heldout.jsonl").read_bytes()


def test_no_temporary_files_left(tmp_path, data_dir):
    output = run_prompts(make_config(tmp_path / "runs", data_dir))
    names = sorted(path.name for path in output.iterdir())
    assert names == sorted(["train.jsonl", "heldout.jsonl", "rejects.jsonl", "config.yaml", MANIFEST_NAME])


def test_low_kept_fraction_fails_without_manifest(tmp_path):
    folder = tmp_path / "data"
    write_chat_file(folder / "chat.jsonl", rows=GOOD_CHAT_ROWS[:1], bad_lines=BAD_CHAT_LINES)
    config = validate_config(
        {
            "data": {
                "data_dir": str(folder),
                "sources": [{"name": "chat", "path": "chat.jsonl"}],
                "min_kept_fraction": 0.5,
            },
            "storage": {"root": str(tmp_path / "runs")},
        }
    )
    with pytest.raises(RuntimeError, match=r"kept 1/5 .*data\.min_kept_fraction"):
        run_prompts(config)
    output = tmp_path / "runs" / "prompts"
    (run_dir,) = list(output.iterdir())
    assert read_manifest(run_dir) is None
    assert len((run_dir / "rejects.jsonl").read_text().splitlines()) == 4


def test_read_records_reports_bad_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(ValueError, match="records.jsonl:2"):
        read_records(path)


def test_shipped_benchmark_files(tmp_path):
    names = sorted(path.stem for path in SHARED_EVAL.glob("*.jsonl"))
    config = validate_config(
        {
            "data": {"data_dir": str(SHARED_EVAL), "sources": [{"name": name} for name in names]},
            "storage": {"root": str(tmp_path / "runs")},
        }
    )
    output = run_prompts(config)
    manifest = read_manifest(output)
    records = all_records(output)
    line_counts = {name: (SHARED_EVAL / f"{name}.jsonl").read_bytes().count(b"\n") for name in names}

    assert len(names) == 11
    assert manifest["counts"]["rows"] == sum(line_counts.values())
    assert manifest["counts"]["kept"] == len(records)
    assert set(manifest["rejected"]) <= {"duplicate"}
    assert manifest["sources"]["gsm8k"]["kept"] == line_counts["gsm8k"]
    assert 0.07 < manifest["counts"]["heldout"] / len(records) < 0.13
    mt_bench = [record for record in records if record["source"] == "mt-bench"]
    assert len(mt_bench) == line_counts["mt-bench"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] * 2 for r in mt_bench)
    answers = [m["content"] for record in records for m in record["messages"] if m["role"] == "assistant"]
    assert set(answers) == {None}
    # One arena-hard prompt contains U+2028, which str.splitlines also treats as a line break.
    for split in ("train", "heldout"):
        lines = (output / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == manifest["counts"][split]


def test_fixed_source_split_overrides_hash(tmp_path, data_dir):
    sources = [
        {"name": "chat", "path": "chat.jsonl", "split": "train"},
        {"name": "mini-bench", "split": "heldout"},
        {"name": "extra", "path": "extra.parquet"},
    ]
    config = make_config(tmp_path / "runs", data_dir, sources=sources)
    records = all_records(run_prompts(config))
    by_source = {}
    for record in records:
        by_source.setdefault(record["source"], set()).add(record["split"])
    assert by_source["chat"] == {"train"}
    assert by_source["mini-bench"] == {"heldout"}
    for record in records:
        if record["source"] == "extra":
            assert record["split"] == split_of(record["id"], 0.3, config.data.split_salt)

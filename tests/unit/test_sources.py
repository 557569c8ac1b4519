import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepspec.config import SourceConfig
from deepspec.data.benchmarks import BENCHMARKS, REASONING_SUFFIX, benchmark_spec
from deepspec.data.records import Rejection
from deepspec.data.sources import HF_MIRROR_ENV, describe_source, iter_source_rows
from deepspec.manifest import sha256_file

SHARED_EVAL = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "eval"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes lock files under its cache folder; keep them out of the home directory.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    monkeypatch.delenv(HF_MIRROR_ENV, raising=False)


def shared_rows(name, count=None):
    with open(SHARED_EVAL / f"{name}.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows if count is None else rows[:count]


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def write_jsonl(path, rows):
    return write_lines(path, [json.dumps(row).encode() for row in rows])


def write_parquet(path, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def collect(source, data_dir=None):
    return list(iter_source_rows(source, data_dir))


def test_jsonl_malformed_line_rejected_not_fatal(tmp_path):
    path = write_lines(
        tmp_path / "rows.jsonl",
        [b'{"turns": ["one"]}', b'{"turns": ["two"', b"", b'{"turns": ["three"]}'],
    )
    rows = collect(SourceConfig(name="local", path=str(path)))
    assert rows[0] == {"turns": ["one"]}
    assert rows[2] == {"turns": ["three"]}
    assert isinstance(rows[1], Rejection)
    assert rows[1].reason == "invalid_json"
    assert f"{path}:2" in rows[1].detail
    assert len(rows) == 3


def test_jsonl_invalid_utf8_rejected(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", [b'{"turns": ["\xff\xfe"]}', b'{"turns": ["ok"]}'])
    rows = collect(SourceConfig(name="local", path=str(path)))
    assert isinstance(rows[0], Rejection)
    assert rows[0].reason == "invalid_json"
    assert f"{path}:1" in rows[0].detail
    assert rows[1] == {"turns": ["ok"]}


def test_max_rows_keeps_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"turns": [f"q{index}"]} for index in range(10)])
    rows = collect(SourceConfig(name="local", path=str(path), max_rows=3))
    assert rows == [{"turns": ["q0"]}, {"turns": ["q1"]}, {"turns": ["q2"]}]


def test_relative_path_resolves_against_data_dir(tmp_path):
    write_jsonl(tmp_path / "sub" / "rows.jsonl", [{"turns": ["q"]}])
    rows = collect(SourceConfig(name="local", path="sub/rows.jsonl"), tmp_path)
    assert rows == [{"turns": ["q"]}]


def test_missing_path_names_source_and_path(tmp_path):
    source = SourceConfig(name="mine", path="absent.jsonl")
    with pytest.raises(FileNotFoundError, match=r"'mine'.*absent\.jsonl"):
        iter_source_rows(source, tmp_path)


def test_unsupported_suffix_raises(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported file suffix '.txt'"):
        iter_source_rows(SourceConfig(name="local", path=str(path)), None)


def test_local_parquet_rows(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", {"turns": [["a"], ["b", "c"]]})
    rows = collect(SourceConfig(name="local", path=str(path)))
    assert rows == [{"turns": ["a"]}, {"turns": ["b", "c"]}]


def test_hf_id_local_file(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    rows = collect(SourceConfig(name="chat", hf_id=str(path)))
    assert rows == [{"messages": [{"role": "user", "content": "hi"}]}]


def test_hf_id_local_dataset_folder_split(tmp_path):
    folder = tmp_path / "dataset"
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", {"turns": [["train row"]]})
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", {"turns": [["test row"]]})
    rows = collect(SourceConfig(name="chat", hf_id=str(folder), hf_split="test"))
    assert rows == [{"turns": ["test row"]}]


def test_hf_id_resolves_through_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_jsonl(mirror / "someone" / "chats" / "train.jsonl", [{"turns": ["from the mirror"]}])
    monkeypatch.setenv(HF_MIRROR_ENV, str(mirror))
    rows = collect(SourceConfig(name="chat", hf_id="someone/chats"))
    assert rows == [{"turns": ["from the mirror"]}]


def test_mirror_without_dataset_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(HF_MIRROR_ENV, str(tmp_path / "mirror"))
    with pytest.raises(FileNotFoundError, match=HF_MIRROR_ENV):
        iter_source_rows(SourceConfig(name="chat", hf_id="someone/absent"), None)
    with pytest.raises(FileNotFoundError, match="openai/gsm8k"):
        iter_source_rows(SourceConfig(name="gsm8k"), None)


def test_benchmark_file_in_data_dir(tmp_path):
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"turns": ["local copy"]}])
    assert collect(SourceConfig(name="gsm8k"), tmp_path) == [{"turns": ["local copy"]}]


def test_unknown_benchmark_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="not a known benchmark.*gsm8k"):
        iter_source_rows(SourceConfig(name="no-such-benchmark"), tmp_path)


def write_gsm8k_standin(mirror, questions):
    """Lay out a copy of the openai/gsm8k hub repository: a configs header and per-config parquet files."""
    repo = mirror / "openai" / "gsm8k"
    answers = ["#### 0"] * len(questions)
    write_parquet(repo / "main" / "test-00000-of-00001.parquet", {"question": questions, "answer": answers})
    write_parquet(repo / "main" / "train-00000-of-00001.parquet", {"question": ["train only"], "answer": ["#### 1"]})
    write_parquet(repo / "socratic" / "test-00000-of-00001.parquet", {"question": ["socratic"], "answer": ["#### 2"]})
    (repo / "README.md").write_text(
        "---\n"
        "configs:\n"
        "- config_name: main\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: main/train-*\n"
        "  - split: test\n"
        "    path: main/test-*\n"
        "- config_name: socratic\n"
        "  data_files:\n"
        "  - split: test\n"
        "    path: socratic/test-*\n"
        "---\n"
    )


def test_gsm8k_from_mirror_matches_shipped_file(tmp_path, monkeypatch):
    expected = shared_rows("gsm8k", 5)
    questions = [row["turns"][0].removesuffix(REASONING_SUFFIX) for row in expected]
    assert all(len(question) < len(row["turns"][0]) for question, row in zip(questions, expected, strict=False))
    mirror = tmp_path / "mirror"
    write_gsm8k_standin(mirror, questions)
    monkeypatch.setenv(HF_MIRROR_ENV, str(mirror))

    rows = collect(SourceConfig(name="gsm8k"), tmp_path / "empty-data-dir")

    assert rows == expected


def test_gsm8k_data_dir_file_wins_over_hub(tmp_path, monkeypatch):
    write_gsm8k_standin(tmp_path / "mirror", ["from the hub"])
    monkeypatch.setenv(HF_MIRROR_ENV, str(tmp_path / "mirror"))
    write_jsonl(tmp_path / "data" / "gsm8k.jsonl", [{"turns": ["from the data folder"]}])
    assert collect(SourceConfig(name="gsm8k"), tmp_path / "data") == [{"turns": ["from the data folder"]}]


def test_repository_file_benchmarks_from_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    arena = shared_rows("arena-hard-v2", 3)
    write_jsonl(
        mirror / "lmarena-ai" / "arena-hard-auto" / "data" / "arena-hard-v2.0" / "question.jsonl",
        [{"uid": str(index), "prompt": row["turns"][0]} for index, row in enumerate(arena)],
    )
    lbpp = shared_rows("lbpp", 3)
    write_parquet(
        mirror / "CohereLabs" / "lbpp" / "python" / "test.parquet",
        {"instruction": [row["turns"][0] for row in lbpp], "task_id": ["a", "b", "c"]},
    )
    monkeypatch.setenv(HF_MIRROR_ENV, str(mirror))

    assert collect(SourceConfig(name="arena-hard-v2")) == arena
    assert collect(SourceConfig(name="lbpp")) == lbpp


def test_benchmark_row_without_field_rejected(tmp_path, monkeypatch):
    write_gsm8k_standin(tmp_path / "mirror", ["fine"])
    repo = tmp_path / "mirror" / "openai" / "gsm8k"
    for split in ("train", "test"):
        write_parquet(repo / "main" / f"{split}-00000-of-00001.parquet", {"text": ["no question column"]})
    monkeypatch.setenv(HF_MIRROR_ENV, str(tmp_path / "mirror"))
    rows = collect(SourceConfig(name="gsm8k"))
    assert len(rows) == 1
    assert isinstance(rows[0], Rejection)
    assert rows[0].reason == "invalid_benchmark_row"


# The formatters must rebuild every shipped prompt from its source fields. Each case recovers the fields
# from the shipped text and formats them again.
def humaneval_fields(text):
    prefix = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
    assert text.startswith(prefix)
    assert text.endswith("\n```")
    return {"prompt": text[len(prefix) : -len("\n```")]}


def swe_bench_fields(text):
    match = re.fullmatch(r"Problem Statement:\n(.*)\nPlease fix the issue described above\.", text, re.DOTALL)
    assert match is not None
    return {"problem_statement": match.group(1)}


def livecodebench_fields(text):
    match = re.fullmatch(
        r".*### Question:\n(.*)\n\n### Format: (.*?)\n```python\n(.*)\n```\n\n### Answer: .*", text, re.DOTALL
    )
    assert match is not None
    question, label, code = match.groups()
    starter = "" if label == "Write your code in the following format:" else code
    return {"question_content": question, "starter_code": starter}


def math_fields(text):
    assert text.endswith(REASONING_SUFFIX)
    return {"problem": text.removesuffix(REASONING_SUFFIX)}


@pytest.mark.parametrize(
    ("name", "fields_of"),
    [
        ("gsm8k", lambda text: {"question": text.removesuffix(REASONING_SUFFIX)}),
        ("math500", math_fields),
        ("aime24", math_fields),
        ("aime25", math_fields),
        ("humaneval", humaneval_fields),
        ("mbpp", lambda text: {"prompt": text}),
        ("lbpp", lambda text: {"instruction": text}),
        ("swe-bench", swe_bench_fields),
        ("livecodebench", livecodebench_fields),
        ("arena-hard-v2", lambda text: {"prompt": text}),
    ],
)
def test_formatter_rebuilds_shipped_prompts(name, fields_of):
    spec = benchmark_spec(name)
    for row in shared_rows(name):
        assert spec.format_turns(fields_of(row["turns"][0])) == row["turns"]


def test_mt_bench_keeps_both_turns():
    spec = benchmark_spec("mt-bench")
    for row in shared_rows("mt-bench"):
        assert spec.format_turns({"prompt": row["turns"], "category": "writing"}) == row["turns"]


def test_alpaca_input_appended():
    spec = benchmark_spec("alpaca")
    assert spec.format_turns({"instruction": "Sum.", "input": "1 2", "output": "3"}) == ["Sum.\n\nInput:\n1 2"]
    assert spec.format_turns({"instruction": "Hi.", "input": "", "output": "x"}) == ["Hi."]


def test_registry_covers_shipped_benchmarks():
    shipped = {path.stem for path in SHARED_EVAL.glob("*.jsonl")}
    assert shipped <= set(BENCHMARKS)
    assert "alpaca" in BENCHMARKS


def test_describe_source_checksums_local_file(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"turns": ["q"]}])
    described = describe_source(SourceConfig(name="gsm8k"), tmp_path)
    assert described["kind"] == "file"
    assert described["sha256"] == sha256_file(path)
    assert described["bytes"] == path.stat().st_size

"""The cache stage end to end on a tiny random Qwen3 target saved as a local directory."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.cache import stage as cache_stage
from deepspec.cache.format import (
    CACHE_INFO_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    UNIT_RECORDS,
    shard_file_name,
    unit_index_path,
    unit_is_complete,
)
from deepspec.cache.reader import CacheReader
from deepspec.cache.stage import finalize_cache, run_cache
from deepspec.config import ConfigError, PipelineConfig, validate_config
from deepspec.manifest import MANIFEST_NAME, StageInputError, file_entries, read_manifest, sha256_file, write_manifest
from deepspec.pipeline import stage_fingerprints, stage_inputs, stage_output, stage_settings
from deepspec.targets.toy import train_tokenizer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_RECORDS = 2 * UNIT_RECORDS + 22
NUM_TARGET_LAYERS = 3
WORDS = "the cat sat on a mat while seven blue birds sang about numbers and code in the quiet morning".split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _records() -> list[dict[str, Any]]:
    rng = random.Random(0)
    records = []
    for index in range(NUM_RECORDS):
        messages = [
            {"role": "user", "content": _text(rng, rng.randint(3, 10))},
            {"role": "assistant", "content": _text(rng, rng.randint(2, 14))},
        ]
        records.append({"id": f"rec-{index:04d}", "source": "tiny", "split": "train", "messages": messages})
    # An answer far beyond cache.max_length, and a conversation without an answer.
    records[5]["messages"][1]["content"] = _text(rng, 400)
    records[70]["messages"] = records[70]["messages"][:1]
    random.Random(1).shuffle(records)
    return records


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("target")
    texts = [message["content"] for record in _records() for message in record["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=320, model_max_length=512)
    torch.manual_seed(0)
    model_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=NUM_TARGET_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(model_config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _config(root: Path, target_dir: Path, **cache: Any) -> PipelineConfig:
    settings: dict[str, Any] = {"layer_ids": [0, 1], "max_length": 96, "batch_size": 8, "min_kept_fraction": 0.5}
    settings.update(cache)
    raw = {
        "target": {"name_or_path": str(target_dir)},
        "data": {"sources": [{"name": "tiny", "path": "tiny.jsonl"}]},
        "cache": settings,
        "storage": {"root": str(root)},
    }
    return validate_config(raw)


def _write_regen_output(config: PipelineConfig, records: list[dict[str, Any]] | None = None) -> None:
    directory = stage_output(config, "regen")
    directory.mkdir(parents=True)
    lines = [json.dumps(record) + "\n" for record in (_records() if records is None else records)]
    (directory / "records.jsonl").write_text("".join(lines), encoding="utf-8")
    write_manifest(
        directory,
        stage="regen",
        stage_fingerprint=stage_fingerprints(config)["regen"],
        settings=stage_settings(config, "regen"),
        inputs=stage_inputs(config, "regen"),
        counts={"in": len(lines), "out": len(lines)},
        files=file_entries(directory, ["records.jsonl"]),
    )


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # One thread, as torchrun sets it: tiny matmuls on two threads of a busy machine wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _torchrun(config: PipelineConfig, config_file: Path, processes: int) -> subprocess.CompletedProcess[str]:
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "deepspec.cache.stage",
        "--config",
        str(config_file),
    ]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _assert_same_samples(left: CacheReader, right: CacheReader) -> None:
    assert len(left) == len(right)
    assert left.record_ids == right.record_ids
    for position in range(len(left)):
        a, b = left[position], right[position]
        for key in ("input_ids", "loss_mask", "target_hidden", "target_last_hidden"):
            assert torch.equal(a[key], b[key]), f"sample {position} ({left.record_ids[position]}): {key} differs"


def test_torchrun_two_ranks_match_one_rank(tmp_path: Path, target_dir: Path) -> None:
    outputs = {}
    for processes in (2, 1):
        config = _config(tmp_path / f"runs-{processes}", target_dir)
        _write_regen_output(config)
        result = _torchrun(config, tmp_path / f"config-{processes}.yaml", processes)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        outputs[processes] = stage_output(config, "cache")
        assert "cache finished" in result.stdout

    two, one = CacheReader(outputs[2]), CacheReader(outputs[1])
    _assert_same_samples(two, one)
    assert len(two) == NUM_RECORDS - 2
    assert two.record_ids == sorted(two.record_ids)
    assert json.loads((outputs[2] / CACHE_INFO_NAME).read_text())["num_units"] == 3
    for output in outputs.values():
        assert (output / "config.yaml").is_file()
        assert sorted(path.name for path in (output / SHARDS_DIR).glob("*.tmp")) == []


def test_rejects_counted_by_reason(tmp_path: Path, target_dir: Path) -> None:
    config = _config(tmp_path / "runs", target_dir, hidden_dtype="float32")
    _write_regen_output(config)
    output = run_cache(config)

    manifest = read_manifest(output)
    assert manifest is not None
    assert manifest["rejected"] == {"no_assistant_turn": 1, "too_long": 1}
    assert manifest["counts"]["in"] == NUM_RECORDS
    assert manifest["counts"]["out"] == NUM_RECORDS - 2
    rejects = {json.loads(line)["id"]: json.loads(line) for line in (output / REJECTS_NAME).read_text().splitlines()}
    assert rejects["rec-0005"]["reason"] == "too_long"
    assert "max_length=96" in rejects["rec-0005"]["detail"]
    assert rejects["rec-0070"]["reason"] == "no_assistant_turn"

    reader = CacheReader(output)
    assert "rec-0005" not in reader.record_ids
    assert reader.hidden_dtype == "float32"
    info = json.loads((output / CACHE_INFO_NAME).read_text())
    assert info["target"]["name_or_path"] == str(target_dir)
    assert info["target"]["num_layers"] == NUM_TARGET_LAYERS
    assert info["source"]["fingerprint"] == stage_fingerprints(config)["regen"]
    assert info["source"]["records_sha256"] == sha256_file(stage_output(config, "regen") / "records.jsonl")
    assert info["supervised_tokens"] == int(reader.loss_tokens.sum())
    assert info["max_length"] == 96
    assert all(reader.seq_lens <= 96)


def test_resume_after_crash_keeps_finished_units(
    tmp_path: Path, target_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_config = _config(tmp_path / "reference", target_dir)
    _write_regen_output(reference_config)
    reference = CacheReader(run_cache(reference_config))

    config = _config(tmp_path / "runs", target_dir)
    _write_regen_output(config)
    output = stage_output(config, "cache")
    real_capture = cache_stage.capture_hidden_states
    calls = {"count": 0}

    def crash_in_second_unit(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        # Unit 0 takes 8 batches of 8; the crash hits unit 1 after two of its batches are written.
        if calls["count"] == 11:
            raise RuntimeError("simulated crash")
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(cache_stage, "capture_hidden_states", crash_in_second_unit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cache(config)
    monkeypatch.setattr(cache_stage, "capture_hidden_states", real_capture)
    assert unit_is_complete(output, 0)
    assert not unit_is_complete(output, 1)
    assert read_manifest(output) is None

    finished = output / shard_file_name(0)
    digest, mtime = sha256_file(finished), finished.stat().st_mtime_ns
    index_text = unit_index_path(output, 0).read_text()
    run_cache(config)

    assert sha256_file(finished) == digest
    assert finished.stat().st_mtime_ns == mtime
    assert unit_index_path(output, 0).read_text() == index_text
    resumed = CacheReader(output)
    assert len(set(resumed.record_ids)) == len(resumed.record_ids)
    _assert_same_samples(resumed, reference)
    resumed.verify_checksums()


def test_crash_between_shard_and_index_rebuilds_unit(
    tmp_path: Path, target_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path / "runs", target_dir)
    _write_regen_output(config)
    output = stage_output(config, "cache")
    from deepspec.cache import format as cache_format

    real_write = cache_format.atomic_write_json

    def fail_on_unit_two(path: Any, value: Any) -> None:
        if Path(path) == unit_index_path(output, 2):
            raise OSError("simulated disk failure")
        real_write(path, value)

    monkeypatch.setattr(cache_format, "atomic_write_json", fail_on_unit_two)
    with pytest.raises(OSError, match="simulated disk failure"):
        run_cache(config)
    monkeypatch.setattr(cache_format, "atomic_write_json", real_write)
    assert (output / shard_file_name(2)).is_file()
    assert not unit_is_complete(output, 2)

    run_cache(config)
    reader = CacheReader(output)
    assert len(reader) == NUM_RECORDS - 2
    assert len(set(reader.record_ids)) == len(reader.record_ids)
    reader.verify_checksums()


@pytest.fixture
def restore_logging() -> Any:
    """Undo the root-logger setup that the stage's ``main`` performs."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_finalize_alone_and_up_to_date(
    tmp_path: Path, target_dir: Path, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    config = _config(tmp_path / "runs", target_dir)
    _write_regen_output(config)
    output = run_cache(config)
    index_bytes = (output / "index.bin").read_bytes()
    (output / MANIFEST_NAME).unlink()
    (output / CACHE_INFO_NAME).unlink()

    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    assert cache_stage.main(["--config", str(config_file), "--finalize"]) == 0
    assert (output / "index.bin").read_bytes() == index_bytes
    assert len(CacheReader(output)) == NUM_RECORDS - 2

    capsys.readouterr()
    assert run_cache(config) == output
    assert finalize_cache(config) == output
    assert capsys.readouterr().out.count("is up to date") == 2


def test_last_layer_fails_before_any_work(tmp_path: Path, target_dir: Path) -> None:
    config = _config(tmp_path / "runs", target_dir, layer_ids=[0, NUM_TARGET_LAYERS - 1])
    _write_regen_output(config)
    with pytest.raises(ConfigError, match=r"cache.layer_ids=\[0, 2\] contains 2, the target's last layer"):
        run_cache(config)
    output = stage_output(config, "cache")
    assert not (output / SHARDS_DIR).exists()
    assert read_manifest(output) is None


def test_low_kept_fraction_fails_without_manifest(tmp_path: Path, target_dir: Path) -> None:
    config = _config(tmp_path / "runs", target_dir, max_length=16)
    _write_regen_output(config)
    with pytest.raises(
        RuntimeError, match="kept .* below cache.min_kept_fraction=0.5; rejected by reason: .*too_long="
    ):
        run_cache(config)
    output = stage_output(config, "cache")
    assert read_manifest(output) is None
    assert not (output / CACHE_INFO_NAME).exists()


def test_missing_regen_output_names_the_stage(tmp_path: Path, target_dir: Path) -> None:
    config = _config(tmp_path / "runs", target_dir)
    with pytest.raises(StageInputError, match="no finished regen output"):
        run_cache(config)


def test_empty_regen_output_fails(tmp_path: Path, target_dir: Path) -> None:
    config = _config(tmp_path / "runs", target_dir)
    _write_regen_output(config, records=[])
    with pytest.raises(RuntimeError, match="cache: no input records"):
        run_cache(config)
    assert read_manifest(stage_output(config, "cache")) is None

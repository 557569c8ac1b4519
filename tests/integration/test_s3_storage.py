"""Stage outputs on S3, against a real S3 protocol server (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from deepspec.config import ConfigError, load_config
from deepspec.pipeline import STAGES, stage_fingerprints
from deepspec.storage import open_storage
from tests.integration.pipeline_helpers import tiny_pipeline_config, tiny_pipeline_raw, write_config

pytestmark = pytest.mark.integration

BUCKET = "deepspec-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield endpoint
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class RecordingClient:
    """The real boto3 client, with the order of uploaded keys recorded."""

    def __init__(self) -> None:
        self._client = boto3.client("s3")
        self.uploaded: list[str] = []

    def upload_file(self, filename: str, bucket: str, key: str) -> None:
        self.uploaded.append(key)
        self._client.upload_file(filename, bucket, key)

    def __getattr__(self, name: str):
        return getattr(self._client, name)


def keys_under(prefix: str) -> set[str]:
    paginator = boto3.client("s3").get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def s3_config(tmp_path: Path, prefix: str, staging: Path):
    raw = tiny_pipeline_raw(Path("unused"), Path("unused"))
    raw["storage"] = {"root": f"s3://{BUCKET}/{prefix}", "staging_dir": str(staging)}
    return load_config(write_config(tmp_path / f"{prefix}.yaml", raw))


def test_push_uploads_manifest_last(s3_endpoint, tmp_path):
    config = s3_config(tmp_path, "unit", tmp_path / "staging")
    client = RecordingClient()
    storage = open_storage(config, client=client)
    output = storage.local_dir("cache", "abc")
    (output / "shards").mkdir(parents=True)
    (output / "shards" / "unit-0.bin").write_bytes(b"x" * 1000)
    (output / "index.bin").write_bytes(b"i" * 10)
    (output / ".index.bin.123.tmp").write_bytes(b"half-written")
    (output / "_MANIFEST.json").write_text("{}")

    storage.push("cache", "abc", final=False)
    assert "unit/cache/abc/_MANIFEST.json" not in client.uploaded
    assert not storage.has_manifest("cache", "abc")

    storage.push("cache", "abc", final=True)
    assert client.uploaded[-1] == "unit/cache/abc/_MANIFEST.json"
    assert keys_under("unit/cache/abc/") == {
        "unit/cache/abc/shards/unit-0.bin",
        "unit/cache/abc/index.bin",
        "unit/cache/abc/_MANIFEST.json",
    }
    assert storage.has_manifest("cache", "abc")

    client.uploaded.clear()
    storage.push("cache", "abc", final=False)
    assert client.uploaded == []


def test_final_push_prunes_and_pull_mirrors(s3_endpoint, tmp_path):
    config = s3_config(tmp_path, "prune", tmp_path / "staging")
    storage = open_storage(config)
    output = storage.local_dir("train", "f1")
    (output / "checkpoints" / "step_2").mkdir(parents=True)
    (output / "checkpoints" / "step_2" / "model.safetensors").write_bytes(b"old")
    storage.push("train", "f1", final=False)
    (output / "checkpoints" / "step_2" / "model.safetensors").unlink()
    (output / "checkpoints" / "step_4").mkdir()
    (output / "checkpoints" / "step_4" / "model.safetensors").write_bytes(b"new")
    (output / "_MANIFEST.json").write_text("{}")
    storage.push("train", "f1", final=True)
    assert keys_under("prune/train/f1/") == {
        "prune/train/f1/checkpoints/step_4/model.safetensors",
        "prune/train/f1/_MANIFEST.json",
    }

    mirror = open_storage(s3_config(tmp_path, "prune", tmp_path / "other-staging"))
    assert mirror.pull("train", "f1") == 2
    pulled = mirror.local_dir("train", "f1")
    assert (pulled / "checkpoints" / "step_4" / "model.safetensors").read_bytes() == b"new"
    assert mirror.pull("train", "f1") == 0
    assert mirror.push("train", "f1", final=True) == 1  # only the manifest is always rewritten


def test_root_without_bucket_is_rejected(tmp_path):
    raw = tiny_pipeline_raw(Path("unused"), Path("unused"))
    raw["storage"] = {"root": "s3:///prefix"}
    with pytest.raises(ConfigError, match="names no bucket"):
        load_config(write_config(tmp_path / "bad.yaml", raw))


def deepspec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepspec.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_pipeline_on_s3_resumes_elsewhere(s3_endpoint, tiny_target_dir, tmp_path):
    config_path, config = tiny_pipeline_config(
        tiny_target_dir,
        tmp_path / "unused",
        tmp_path,
        storage={"root": f"s3://{BUCKET}/pipeline", "staging_dir": str(tmp_path / "pod-a"), "sync_interval_s": 1},
        train={"max_steps": 4, "nproc_per_node": 2},
    )
    first = deepspec("run", "--config", str(config_path))
    assert first.returncode == 0, first.stdout + first.stderr
    fingerprints = stage_fingerprints(config)
    for stage in STAGES:
        assert f"pipeline/{stage}/{fingerprints[stage]}/_MANIFEST.json" in keys_under(f"pipeline/{stage}/"), stage
    assert f"pipeline/eval/{fingerprints['eval']}/report.json" in keys_under("pipeline/eval/")

    # Another pod, with an empty staging folder, finds every stage done without downloading anything.
    fresh = ["--config", str(config_path), "--set", f"storage.staging_dir={tmp_path / 'pod-b'}"]
    status = deepspec("status", *fresh)
    assert status.returncode == 0, status.stderr
    assert all(f"{stage:<8} done" in status.stdout for stage in STAGES), status.stdout
    assert deepspec("wait", "eval", *fresh, "--timeout", "5").returncode == 0
    again = deepspec("train", *fresh)
    assert again.returncode == 0, again.stderr
    assert "train: up to date" in again.stdout + again.stderr
    assert not (tmp_path / "pod-b" / BUCKET / "pipeline" / "cache").exists()


def test_s3_stage_names_missing_upstream(s3_endpoint, tiny_target_dir, tmp_path):
    config_path, _ = tiny_pipeline_config(
        tiny_target_dir,
        tmp_path / "unused",
        tmp_path,
        storage={"root": f"s3://{BUCKET}/empty", "staging_dir": str(tmp_path / "staging")},
    )
    completed = deepspec("cache", "--config", str(config_path))
    assert completed.returncode == 2
    assert "regen" in completed.stderr + completed.stdout


def test_multi_node_s3_cache_rejected(s3_endpoint, tiny_target_dir, tmp_path):
    config_path, _ = tiny_pipeline_config(
        tiny_target_dir,
        tmp_path / "unused",
        tmp_path,
        storage={"root": f"s3://{BUCKET}/multi", "staging_dir": str(tmp_path / "staging")},
    )
    completed = deepspec(
        "cache", "--config", str(config_path), env={"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "0"}
    )
    assert completed.returncode == 2
    assert "ReadWriteMany" in completed.stderr + completed.stdout


def test_unfinished_push_keeps_other_shards(s3_endpoint, tmp_path):
    first = open_storage(s3_config(tmp_path, "shards", tmp_path / "pod-0"))
    second = open_storage(s3_config(tmp_path, "shards", tmp_path / "pod-1"))
    for index, storage in enumerate((first, second)):
        shard_dir = storage.local_dir("regen", "f2") / "shards"
        shard_dir.mkdir(parents=True)
        (shard_dir / f"shard-{index}.jsonl").write_text("{}\n")
        storage.push("regen", "f2", final=True)
    assert keys_under("shards/regen/f2/") == {
        "shards/regen/f2/shards/shard-0.jsonl",
        "shards/regen/f2/shards/shard-1.jsonl",
    }


def test_unreachable_s3_gives_one_error_line(tmp_path):
    raw = tiny_pipeline_raw(Path("unused"), Path("unused"))
    raw["storage"] = {"root": f"s3://{BUCKET}/down", "staging_dir": str(tmp_path / "staging")}
    config_path = write_config(tmp_path / "down.yaml", raw)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    completed = deepspec("status", "--config", str(config_path), env={**env, "AWS_MAX_ATTEMPTS": "1"})
    assert completed.returncode == 2
    output = completed.stdout + completed.stderr
    assert "S3 request failed: EndpointConnectionError" in output
    assert "Traceback" not in output

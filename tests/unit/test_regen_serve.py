"""`deepspec serve-target` commands, regen sharding flags and what the regen fingerprint depends on."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from deepspec.cli import main
from deepspec.config import PipelineConfig
from deepspec.pipeline import stage_fingerprints
from deepspec.regen.serve import ServeOptions, serve_command
from deepspec.regen.shards import ShardSpec


def config_for(target: str, **regen: object) -> PipelineConfig:
    raw = {
        "target": {"name_or_path": target, "dtype": "bfloat16"},
        "data": {"sources": [{"name": "gsm8k"}]},
        "regen": {
            "backend": "openai",
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "max_new_tokens": 4096,
            "openai": {"endpoints": ["http://127.0.0.1:8000/v1"]},
            **regen,
        },
    }
    return PipelineConfig.model_validate(raw)


def test_vllm_command_for_qwen3(tmp_path, capsys):
    config = config_for("Qwen/Qwen3-4B")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    assert main(["serve-target", "--config", str(path), "--port", "30000", "--max-model-len", "8192"]) == 0
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen3-4B"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags["--served-model-name"] == "Qwen/Qwen3-4B"
    assert flags["--port"] == "30000"
    assert flags["--host"] == "127.0.0.1"
    assert flags["--dtype"] == "bfloat16"
    assert flags["--max-model-len"] == "8192"
    assert flags["--reasoning-parser"] == "qwen3"
    assert flags["--generation-config"] == "vllm"
    defaults = json.loads(flags["--override-generation-config"])
    assert defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0, "max_new_tokens": 4096}


def test_sglang_command_uses_the_configured_model_name(tiny_target_dir):
    config = config_for(str(tiny_target_dir), top_k=0, openai={"endpoints": ["http://x:1/v1"], "model": "target"})
    options = ServeOptions(engine="sglang", host="0.0.0.0", port=30001, tensor_parallel_size=2)
    command = serve_command(config, str(tiny_target_dir), options)
    assert command[:3] == ["python3", "-m", "sglang.launch_server"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags["--model-path"] == str(tiny_target_dir)
    assert flags["--served-model-name"] == "target"
    assert flags["--tp-size"] == "2"
    assert flags["--host"] == "0.0.0.0"
    assert json.loads(flags["--preferred-sampling-params"])["top_k"] == -1
    # The tiny target's config.json has model_type qwen3.
    assert flags["--reasoning-parser"] == "qwen3"


def test_non_qwen3_target_gets_no_reasoning_parser():
    command = serve_command(config_for("google/gemma-3-1b-it"), "google/gemma-3-1b-it", ServeOptions())
    assert "--reasoning-parser" not in command


def test_connection_settings_leave_the_fingerprint_alone():
    base = stage_fingerprints(config_for("Qwen/Qwen3-4B"))["regen"]
    moved = config_for("Qwen/Qwen3-4B", openai={"endpoints": ["http://10.0.0.1:9/v1"], "max_retries": 9})
    assert stage_fingerprints(moved)["regen"] == base
    renamed = config_for("Qwen/Qwen3-4B", openai={"endpoints": ["http://10.0.0.1:9/v1"], "model": "other"})
    assert stage_fingerprints(renamed)["regen"] != base


def test_openai_backend_requires_endpoints():
    with pytest.raises(ValueError, match="regen.openai.endpoints"):
        config_for("Qwen/Qwen3-4B", openai={"endpoints": []})


def test_shard_spec_from_flags_and_job_completion_index():
    assert ShardSpec.resolve(None, None, {}) == ShardSpec(0, 1)
    assert ShardSpec.resolve(None, 4, {"JOB_COMPLETION_INDEX": "3"}) == ShardSpec(3, 4)
    assert ShardSpec.resolve(1, 4, {"JOB_COMPLETION_INDEX": "3"}) == ShardSpec(1, 4)
    with pytest.raises(ValueError, match="--num-shards"):
        ShardSpec.resolve(None, None, {"JOB_COMPLETION_INDEX": "3"})
    with pytest.raises(ValueError, match="--shard-index 4"):
        ShardSpec.resolve(4, 4, {})


def test_shards_cover_each_id_once():
    ids = [f"{n:020x}" for n in range(400)]
    counts = [sum(ShardSpec(index, 4).owns(record_id) for record_id in ids) for index in range(4)]
    assert min(counts) > 60
    assert sum(counts) == len(ids)


def test_script_runs_the_printed_command(tmp_path, capsys):
    config = config_for("Qwen/Qwen3-4B")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    script = tmp_path / "serve" / "serve.sh"
    script.parent.mkdir()
    assert main(["serve-target", "--config", str(path), "--engine", "sglang", "--script", str(script)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    lines = script.read_text(encoding="utf-8").splitlines()
    assert lines == ["#!/bin/sh", f"exec {printed}"]
    assert script.stat().st_mode & 0o111
    assert shlex.split(lines[1])[1:4] == ["python3", "-m", "sglang.launch_server"]

"""The command that serves the target for ``regen.backend: openai``: vLLM or SGLang, set up to match the config.

Usage::

    deepspec serve-target --config configs/qwen3_4b.yaml                   # print the vLLM command
    deepspec serve-target --config configs/qwen3_4b.yaml --engine sglang --launch   # run SGLang

The server gets the served model name that regen requests carry and the
target's dtype and revision. The regen sampling settings become its defaults
(vLLM ``--override-generation-config``, SGLang ``--preferred-sampling-params``),
so requests and server agree even where a request leaves a setting out. Qwen3
targets also get the ``qwen3`` reasoning parser, which returns thinking text
separately from the answer.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deepspec.config import PipelineConfig
from deepspec.manifest import atomic_write_text

Engine = Literal["vllm", "sglang"]
ENGINES: tuple[str, ...] = ("vllm", "sglang")


@dataclass(frozen=True)
class ServeOptions:
    """Launch settings of one server; they do not change the answers."""

    engine: Engine = "vllm"
    host: str = "127.0.0.1"
    port: int = 8000
    tensor_parallel_size: int = 1
    max_model_len: int | None = None


def served_model_name(config: PipelineConfig) -> str:
    """Return the model name requests carry: ``regen.openai.model``, else ``target.name_or_path``."""
    return config.regen.openai.model or config.target.name_or_path


def sampling_defaults(config: PipelineConfig) -> dict[str, float | int]:
    """Return the regen sampling settings in the generation-config form both engines read."""
    regen = config.regen
    return {
        "temperature": regen.temperature,
        "top_p": regen.top_p,
        # -1 disables top-k in both engines.
        "top_k": regen.top_k if regen.top_k > 0 else -1,
        "min_p": regen.min_p,
        "max_new_tokens": regen.max_new_tokens,
    }


def is_qwen3(model_path: str) -> bool:
    """Return whether the target is a Qwen3 model, from its name or its local ``config.json``."""
    if "qwen3" in model_path.lower():
        return True
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        model_type = str(json.loads(config_file.read_text(encoding="utf-8")).get("model_type", ""))
        return model_type.startswith("qwen3")
    return False


def serve_command(config: PipelineConfig, model_path: str, options: ServeOptions) -> list[str]:
    """Return the argv that starts ``options.engine`` serving ``model_path`` for regeneration."""
    if options.engine not in ENGINES:
        raise ValueError(f"--engine {options.engine!r} is not supported; use one of {', '.join(ENGINES)}")
    if options.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {options.tensor_parallel_size}")
    target = config.target
    revision = None if target.name_or_path == "toy" else target.revision
    defaults = json.dumps(sampling_defaults(config), sort_keys=True, separators=(",", ":"))
    reasoning = ["--reasoning-parser", "qwen3"] if is_qwen3(model_path) else []
    if options.engine == "vllm":
        command = ["vllm", "serve", model_path, "--served-model-name", served_model_name(config)]
        command += ["--host", options.host, "--port", str(options.port), "--dtype", target.dtype]
        command += ["--tensor-parallel-size", str(options.tensor_parallel_size)]
        if options.max_model_len is not None:
            command += ["--max-model-len", str(options.max_model_len)]
        if revision:
            command += ["--revision", revision]
        command += ["--generation-config", "vllm", "--override-generation-config", defaults]
        return command + reasoning
    command = ["python3", "-m", "sglang.launch_server", "--model-path", model_path]
    command += ["--served-model-name", served_model_name(config)]
    command += ["--host", options.host, "--port", str(options.port), "--dtype", target.dtype]
    command += ["--tp-size", str(options.tensor_parallel_size)]
    if options.max_model_len is not None:
        command += ["--context-length", str(options.max_model_len)]
    if revision:
        command += ["--revision", revision]
    command += ["--preferred-sampling-params", defaults]
    return command + reasoning


def format_command(command: list[str]) -> str:
    return shlex.join(command)


def write_script(path: str | os.PathLike[str], command: list[str]) -> None:
    """Write ``command`` as an executable ``sh`` script that replaces the shell with the server."""
    atomic_write_text(path, f"#!/bin/sh\nexec {format_command(command)}\n")
    os.chmod(path, 0o755)


def launch(command: list[str]) -> None:
    """Replace this process with the server, so signals and the exit code reach the engine directly."""
    os.execvp(command[0], command)

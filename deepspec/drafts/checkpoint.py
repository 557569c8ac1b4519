"""Hugging Face style draft checkpoints with DeepSpec's tensor names.

A checkpoint directory contains ``config.json`` (the target's Qwen3 config plus
the draft fields, ``architectures: ["Qwen3DSparkModel"]``) and the weights as
safetensors: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``.
This is the layout ``save_pretrained`` writes, so DeepSpec's released DSpark and
DFlash Qwen3 drafts load here and ours load there. Weights are read only with
safetensors, never with pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepspec.drafts.dspark import (
    ARCHITECTURE,
    DSparkConfig,
    Qwen3DSparkModel,
    validate_target_layer_ids,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_shard_size(value: int | str) -> int:
    """Return a shard size in bytes from an int or a string such as ``"500MB"`` or ``"2GiB"``."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", value.upper())
        if match is None:
            raise ValueError(f"max_shard_size {value!r} is invalid; use bytes or a size like '500MB' or '2GiB'")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {value!r}")
    return size


def draft_config_dict(config: DSparkConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Return ``config.json`` content as DeepSpec writes it for a draft saved in ``dtype``.

    DeepSpec stores ``confidence_head_with_markov`` only with a confidence head
    and ``markov_head_type`` only with a Markov head.
    """
    values = config.to_diff_dict()
    if not config.enable_confidence_head:
        values.pop("confidence_head_with_markov", None)
    if config.markov_rank == 0:
        values.pop("markov_head_type", None)
    values["architectures"] = [ARCHITECTURE]
    values["dtype"] = str(dtype).removeprefix("torch.")
    return values


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    current = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > max_bytes:
            shards.append({})
            current = 0
        shards[-1][name] = tensor
        current += size
    return shards


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    for path in directory.iterdir():
        stale = path.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.fullmatch(path.name)
        if stale and path.name not in keep:
            path.unlink()


def save_draft(
    model: Qwen3DSparkModel,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` plus safetensors; return the directory.

    ``dtype`` casts floating-point tensors (default: as they are).
    ``max_shard_size`` (bytes or a string like ``"2GB"``) splits the weights
    into shards plus an index. As with ``save_pretrained``, weights that fit
    in one shard are written as a single ``model.safetensors``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        # A private contiguous CPU copy: safetensors rejects tensors that share storage.
        state[name] = tensor.to("cpu", copy=True).contiguous()
    saved_dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())

    shards = [state] if max_shard_size is None else _split_shards(state, parse_shard_size(max_shard_size))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(state, directory / WEIGHTS_NAME, metadata=metadata)
        written = {WEIGHTS_NAME}
    else:
        weight_map: dict[str, str] = {}
        written = {INDEX_NAME}
        for number, shard in enumerate(shards, start=1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / filename, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, filename))
            written.add(filename)
        total_size = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _remove_stale_weights(directory, written)

    config_text = json.dumps(draft_config_dict(model.config, saved_dtype), indent=2, sort_keys=True) + "\n"
    (directory / CONFIG_NAME).write_text(config_text, encoding="utf-8")
    return directory


def load_draft_config(directory: str | Path) -> DSparkConfig:
    """Read ``config.json`` of a DSpark / DFlash Qwen3 draft checkpoint."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"draft checkpoint config not found: {path}")
    values = json.loads(path.read_text(encoding="utf-8"))
    architectures = values.get("architectures") or []
    if ARCHITECTURE not in architectures:
        raise ValueError(
            f"{path}: architectures is {architectures}, expected [{ARCHITECTURE!r}]; "
            "this loader reads DSpark/DFlash drafts of Qwen3 targets (Eagle3 and Gemma4 drafts are not supported)"
        )
    if values.get("model_type") != "qwen3":
        raise ValueError(f"{path}: model_type is {values.get('model_type')!r}, expected 'qwen3'")
    return DSparkConfig.from_dict(values)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index_path = directory / INDEX_NAME
    single_path = directory / WEIGHTS_NAME
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single_path.is_file():
        weight_map, files = {}, [WEIGHTS_NAME]
    else:
        found = sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory} (found: {found}); "
            "point at a directory written by save_draft or save_pretrained"
        )
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(f"{index_path} lists {filename}, which is missing from {directory}")
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if weight_map and weight_map.get(name) != filename:
                    raise ValueError(f"{path} holds tensor {name!r}, which {index_path} maps to {weight_map.get(name)}")
                tensors[name] = handle.get_tensor(name)
    return tensors


def load_draft(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Qwen3DSparkModel:
    """Load a draft written by ``save_draft`` or by DeepSpec (single file or sharded).

    Tensors keep their stored dtype unless ``dtype`` is given. Raises
    ValueError naming every missing, unexpected or mis-shaped tensor.
    """
    directory = Path(directory)
    config = load_draft_config(directory)
    tensors = _read_tensors(directory)
    with torch.device("meta"):
        model = Qwen3DSparkModel(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name} {tuple(tensors[name].shape)} (expected {expected[name]})"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != expected[name]
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"draft checkpoint {directory} does not match its config.json: missing tensors {missing}, "
            f"unexpected tensors {unexpected}, wrong shapes {mismatched}"
        )
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # The RoPE frequencies are not stored; rebuild them off the meta device.
    model.rotary_emb = type(model.rotary_emb)(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in ("embed_tokens.weight", "lm_head.weight"))
    model.config.dtype = dtype or next(t.dtype for t in tensors.values() if t.is_floating_point())
    return model.to(device).eval()


def check_draft_matches_target(
    draft_config: DSparkConfig, target_config: Any, layer_ids: list[int] | None = None
) -> None:
    """Raise ValueError if the draft was not built for this target (or for these cached ``layer_ids``).

    Compares vocab size, hidden size, the target depth and the target layer
    ids; the message names each differing field with both values.
    """
    problems: list[str] = []
    target_type = getattr(target_config, "model_type", None)
    if target_type != "qwen3":
        problems.append(f"target model_type is {target_type!r}, but this draft needs a 'qwen3' target")
    for field in ("vocab_size", "hidden_size"):
        draft_value, target_value = getattr(draft_config, field, None), getattr(target_config, field, None)
        if draft_value != target_value:
            problems.append(f"{field}: draft {draft_value} != target {target_value}")
    target_layers = getattr(target_config, "num_hidden_layers", None)
    if draft_config.num_target_layers != target_layers:
        problems.append(
            f"num_target_layers: draft {draft_config.num_target_layers} != target num_hidden_layers {target_layers}"
        )
    draft_ids = list(draft_config.target_layer_ids or [])
    if target_layers is not None:
        try:
            validate_target_layer_ids(draft_ids, target_layers)
        except ValueError as error:
            problems.append(f"target_layer_ids: {error}")
    if layer_ids is not None and list(layer_ids) != draft_ids:
        problems.append(f"target_layer_ids: draft {draft_ids} != cached layer ids {list(layer_ids)}")
    if problems:
        raise ValueError("draft does not match the target: " + "; ".join(problems))

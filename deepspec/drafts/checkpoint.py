"""Hugging Face style draft checkpoints with DeepSpec's architecture names and tensor names.

A checkpoint directory contains ``config.json`` and the weights as
safetensors: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``.
``config.json`` is the target's config (Qwen3, or the text config of Gemma4)
with the draft's depth, ``architectures`` (for example
``["Qwen3DSparkModel"]``) and the draft's own fields. This is the layout
``save_pretrained`` writes and DeepSpec releases its drafts in, for example
``deepseek-ai/dspark_qwen3_4b_block7``, so those drafts load here and ours load
there. The architecture name selects the model class through
``deepspec.drafts.registry``. Weights are read only with safetensors, never
with pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from deepspec.drafts.dspark_backbone import validate_target_layer_ids
from deepspec.drafts.registry import DraftArchitecture, UnsupportedArchitectureError, architecture_of

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Computed from the public Qwen3 shapes, bf16 DSpark drafts take about 2.8 GB (4B target) to 6.8 GB
# (14B target), so the larger ones are written as shards.
DEFAULT_MAX_SHARD_SIZE = "5GB"
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


def draft_config_dict(config: PretrainedConfig, dtype: torch.dtype) -> dict[str, Any]:
    """Return ``config.json`` content as DeepSpec writes it for a draft saved in ``dtype``.

    Like ``save_pretrained``, only values that differ from the config class
    defaults are written. For DSpark and DFlash drafts DeepSpec stores
    ``confidence_head_with_markov`` only with a confidence head and
    ``markov_head_type`` only with a Markov head.
    """
    arch = architecture_of(config)
    values = config.to_diff_dict()
    if arch.family == "dspark":
        if not getattr(config, "enable_confidence_head", False):
            values.pop("confidence_head_with_markov", None)
        if not getattr(config, "markov_rank", 0):
            values.pop("markov_head_type", None)
    values["architectures"] = [arch.name]
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
    model: PreTrainedModel,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` plus safetensors; return the directory.

    ``dtype`` casts floating-point tensors (default: as they are, which is
    what training checkpoints need to resume exactly). ``max_shard_size``
    (bytes or a string like ``"2GB"``) splits the weights into shards plus an
    index. As with ``save_pretrained``, weights that fit in one shard are
    written as a single ``model.safetensors``. Use ``save_reference_draft`` for
    the bf16 layout DeepSpec releases.
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


def save_reference_draft(
    model: PreTrainedModel,
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` in the layout of DeepSpec's released drafts: bf16, sharded above ``max_shard_size``."""
    return save_draft(model, directory, dtype=dtype, max_shard_size=max_shard_size)


def read_draft_config_json(directory: str | Path) -> tuple[DraftArchitecture, dict[str, Any]]:
    """Read ``config.json`` of a draft checkpoint and return its registry entry and raw values.

    Raises FileNotFoundError without ``config.json``, UnsupportedArchitectureError
    for an unknown architecture, and ValueError when ``model_type`` does not
    belong to the architecture.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"draft checkpoint config not found: {path}; point at a directory written by save_draft or save_pretrained"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    try:
        arch = architecture_of(values)
    except UnsupportedArchitectureError as error:
        raise UnsupportedArchitectureError(f"{path}: {error}") from error
    if values.get("model_type") != arch.model_type:
        raise ValueError(
            f"{path}: model_type is {values.get('model_type')!r}, but {arch.name} drafts have model_type "
            f"{arch.model_type!r}; the file was not written for this architecture"
        )
    return arch, values


def load_draft_config(directory: str | Path) -> PretrainedConfig:
    """Read ``config.json`` of a draft checkpoint into its architecture's config class."""
    arch, values = read_draft_config_json(directory)
    return _build_config(arch, values, Path(directory) / CONFIG_NAME)


def _build_config(arch: DraftArchitecture, values: dict[str, Any], path: Path) -> PretrainedConfig:
    try:
        return arch.build_config(values)
    except UnsupportedArchitectureError:
        raise
    except (TypeError, ValueError, StrictDataclassFieldValidationError) as error:
        raise ValueError(f"{path} is not a valid {arch.name} config: {error}") from error


def weight_files(directory: str | Path) -> tuple[list[str], dict[str, str]]:
    """Return the weight file names of a checkpoint and its index's tensor-to-file map (empty for one file)."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values())), weight_map
    if (directory / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME], {}
    found = sorted(path.name for path in directory.iterdir()) if directory.is_dir() else []
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory} (found: {found}); "
        "point at a directory written by save_draft or save_pretrained"
    )


def read_draft_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a single-file or sharded checkpoint, checking shards against the index."""
    directory = Path(directory)
    files, weight_map = weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(f"{directory / INDEX_NAME} lists {filename}, which is missing from {directory}")
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if weight_map and weight_map.get(name) != filename:
                    raise ValueError(
                        f"{path} contains tensor {name!r}, which {INDEX_NAME} maps to {weight_map.get(name)}; "
                        "the index and the shards come from different saves"
                    )
                tensors[name] = handle.get_tensor(name)
    listed_only = sorted(set(weight_map) - set(tensors))
    if listed_only:
        raise ValueError(f"{directory / INDEX_NAME} lists tensors that no shard contains: {listed_only}")
    return tensors


def checkpoint_content_hash(directory: str | Path) -> str:
    """Return a sha256 over ``config.json`` and every weight file, by name and content."""
    directory = Path(directory)
    files, _ = weight_files(directory)
    index = [INDEX_NAME] if (directory / INDEX_NAME).is_file() else []
    digest = hashlib.sha256()
    for name in [CONFIG_NAME, *index, *files]:
        file_digest = hashlib.sha256()
        with open(directory / name, "rb") as handle:
            while chunk := handle.read(1 << 20):
                file_digest.update(chunk)
        digest.update(f"{name}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _cached_content_hash(directory: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    return checkpoint_content_hash(directory)


def external_draft_identity(directory: str | Path) -> dict[str, str]:
    """Return the architecture and content hash of a draft directory, which is what identifies it.

    The hash is computed once per process for unchanged files (same names,
    sizes and modification times), because fingerprints are recomputed often.
    Raises FileNotFoundError naming ``eval.draft`` when the directory is not a
    draft checkpoint.
    """
    path = Path(directory).expanduser().resolve()
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"eval.draft={str(directory)!r} has no {CONFIG_NAME}; point it at a draft checkpoint directory "
            "(config.json plus model.safetensors or model.safetensors.index.json)"
        )
    arch, _ = read_draft_config_json(path)
    files, _ = weight_files(path)
    names = [CONFIG_NAME, *([INDEX_NAME] if (path / INDEX_NAME).is_file() else []), *files]
    stamp = tuple((name, (path / name).stat().st_size, (path / name).stat().st_mtime_ns) for name in names)
    return {"architecture": arch.name, "sha256": _cached_content_hash(path, stamp)}


def state_dict_problems(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Name every missing, unexpected and mis-shaped tensor of ``tensors`` against ``expected`` shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name} {tuple(tensors[name].shape)} (expected {expected[name]})"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if mismatched:
        problems.append(f"wrong shapes {mismatched}")
    return problems


def load_draft(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    target_config: PretrainedConfig | None = None,
) -> PreTrainedModel:
    """Load a draft written by ``save_draft`` or by DeepSpec (single file or sharded, bf16 or fp32).

    ``architectures[0]`` in ``config.json`` selects the model class. Tensors
    keep their stored dtype unless ``dtype`` is given. Raises ValueError naming
    every missing, unexpected or mis-shaped tensor and, when ``target_config``
    is given, every field in which the draft does not fit that target (checked
    before any weight is read).
    """
    directory = Path(directory)
    arch, values = read_draft_config_json(directory)
    config = _build_config(arch, values, directory / CONFIG_NAME)
    if target_config is not None:
        try:
            check_draft_matches_target(config, target_config)
        except ValueError as error:
            raise ValueError(f"draft checkpoint {directory}: {error}") from error
    model_class = arch.model_class()
    tensors = read_draft_tensors(directory)
    # Weights are not initialised because every one is loaded below. Buffers that are not
    # saved (RoPE frequencies) are computed by the constructors as usual.
    try:
        with no_init_weights():
            model = model_class(config)
    except ValueError as error:
        raise ValueError(f"{directory / CONFIG_NAME} describes an invalid {arch.name}: {error}") from error
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    problems = state_dict_problems(expected, tensors)
    if problems:
        raise ValueError(
            f"draft checkpoint {directory} ({arch.name}) does not match its config.json: {'; '.join(problems)}. "
            "Check that config.json and the weights come from the same save"
        )
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    # assign=True adopts the stored tensors and dtype but keeps each parameter's requires_grad,
    # so the frozen embedding and head stay frozen.
    model.load_state_dict(tensors, strict=True, assign=True)
    model.config.dtype = dtype or next(t.dtype for t in tensors.values() if t.is_floating_point())
    return model.to(device).eval()


def _target_text_config(target_config: Any) -> Any:
    get_text_config = getattr(target_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else target_config


def check_draft_matches_target(
    draft_config: PretrainedConfig, target_config: Any, layer_ids: list[int] | None = None
) -> None:
    """Raise ValueError if the draft was not built for this target (or for these cached ``layer_ids``).

    Compares the target family, vocab size, hidden size, the target depth
    and the target layer ids. For a multimodal target (Gemma4) the text
    config is compared. The message names each differing field with both values.
    """
    arch = architecture_of(draft_config)
    text_config = _target_text_config(target_config)
    problems: list[str] = []
    target_types = {getattr(target_config, "model_type", None), getattr(text_config, "model_type", None)}
    if not target_types & set(arch.target_model_types):
        problems.append(
            f"target model_type is {getattr(target_config, 'model_type', None)!r}, but a {arch.name} draft needs "
            f"a target of model_type {' or '.join(repr(name) for name in arch.target_model_types)}"
        )
    for field in ("vocab_size", "hidden_size"):
        draft_value, target_value = getattr(draft_config, field, None), getattr(text_config, field, None)
        if draft_value != target_value:
            problems.append(f"{field}: draft {draft_value} != target {target_value}")
    target_layers = getattr(text_config, "num_hidden_layers", None)
    draft_layers = getattr(draft_config, "num_target_layers", None)
    if draft_layers != target_layers:
        problems.append(f"num_target_layers: draft {draft_layers} != target num_hidden_layers {target_layers}")
    draft_ids = list(getattr(draft_config, "target_layer_ids", None) or [])
    if target_layers is not None:
        try:
            validate_target_layer_ids(draft_ids, target_layers)
        except ValueError as error:
            problems.append(f"target_layer_ids: {error}")
    if layer_ids is not None and list(layer_ids) != draft_ids:
        problems.append(
            f"target_layer_ids: draft {draft_ids} != cached layer ids {list(layer_ids)} "
            f"(set cache.layer_ids to {draft_ids} or build the draft from the cached layers)"
        )
    if problems:
        raise ValueError(
            "draft does not match the target: "
            + "; ".join(problems)
            + ". Use the target the draft was trained for, or train a draft for this target"
        )

"""Load the target model and tokenizer named by the config, and find their parts.

``target.name_or_path`` is either ``"toy"`` (built from the benchmark prompt
files and cached) or anything ``from_pretrained`` accepts: a hub id or a local
directory. The helpers that find decoder layers and the final norm cover
Qwen3-like causal LMs and Gemma4-like multimodal models whose text decoder
sits under ``language_model``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from deepspec.config import ConfigError, PipelineConfig
from deepspec.pipeline import DATA_DIR_ENV, resolve_data_dir
from deepspec.targets.toy import ensure_toy_target, read_corpus_rows

logger = logging.getLogger(__name__)

TOY_TARGET = "toy"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Attribute paths from the causal-LM wrapper to the text decoder, most specific first.
_BACKBONE_PATHS = (
    "model.language_model",
    "language_model.model",
    "language_model",
    "model",
    "transformer",
    "gpt_neox",
)
_LAYER_NAMES = ("layers", "h", "decoder.layers")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "decoder.final_layer_norm")


def _corpus_files(config: PipelineConfig) -> list[Path]:
    data_dir = resolve_data_dir(config)
    if data_dir is None:
        raise ConfigError(
            'target.name_or_path="toy" needs the benchmark prompt files, because the toy target is pretrained on '
            f"them: set data.data_dir or the {DATA_DIR_ENV} environment variable to the folder of *.jsonl files"
        )
    if not data_dir.is_dir():
        raise ConfigError(
            f"data.data_dir (or {DATA_DIR_ENV}) = {str(data_dir)!r} is not a directory; "
            "point it at the folder of benchmark *.jsonl files"
        )
    files = sorted(data_dir.glob("*.jsonl"), key=lambda path: path.name)
    if not files:
        raise ConfigError(
            f"data.data_dir (or {DATA_DIR_ENV}) = {str(data_dir)!r} contains no *.jsonl files; "
            "the toy target is pretrained on them, so point it at the benchmark prompt folder"
        )
    return files


def resolve_target(config: PipelineConfig) -> str:
    """Return what ``from_pretrained`` should load: the built toy target's directory, or ``name_or_path``."""
    if config.target.name_or_path != TOY_TARGET:
        return config.target.name_or_path
    rows = read_corpus_rows(_corpus_files(config))
    return str(ensure_toy_target(config.target.toy, rows))


def _revision(config: PipelineConfig) -> str | None:
    return None if config.target.name_or_path == TOY_TARGET else config.target.revision


def load_tokenizer(config: PipelineConfig) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_target(config), revision=_revision(config))


def load_target(config: PipelineConfig, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load the target causal LM in ``target.dtype``, in eval mode, with every parameter frozen."""
    target = config.target
    model = AutoModelForCausalLM.from_pretrained(
        resolve_target(config),
        revision=_revision(config),
        dtype=_DTYPES[target.dtype],
        attn_implementation=target.attn_implementation,
    )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def end_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the ids that end generation: the generation config's EOS ids, else the tokenizer's EOS id."""
    generation_config = getattr(model, "generation_config", None)
    eos = None if generation_config is None else generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"{type(model).__name__} has no eos_token_id in its generation_config and the tokenizer has no "
            "eos_token; set eos_token_id in the model's generation_config.json"
        )
    ids = [eos] if isinstance(eos, int) else list(eos)
    return list(dict.fromkeys(int(token_id) for token_id in ids))


def _get_path(root: object, dotted: str) -> object | None:
    current: object | None = root
    for name in dotted.split("."):
        current = getattr(current, name, None)
        if current is None:
            return None
    return current


def _backbones(model: torch.nn.Module) -> list[torch.nn.Module]:
    found: list[torch.nn.Module] = []
    for path in _BACKBONE_PATHS:
        module = _get_path(model, path)
        if isinstance(module, torch.nn.Module) and module not in found:
            found.append(module)
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(decoder, torch.nn.Module) and decoder not in found:
            found.append(decoder)
    return found


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Return the text decoder's list of layers (``model.model.layers`` for Qwen3)."""
    for backbone in _backbones(model):
        for name in _LAYER_NAMES:
            layers = _get_path(backbone, name)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(
        f"decoder layers of {type(model).__name__} not found: looked for a ModuleList named "
        f"{' or '.join(_LAYER_NAMES)} under {', '.join(_BACKBONE_PATHS)}"
    )


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Return the norm applied after the last decoder layer (``model.model.norm`` for Qwen3)."""
    for backbone in _backbones(model):
        for name in _NORM_NAMES:
            norm = _get_path(backbone, name)
            if isinstance(norm, torch.nn.Module):
                return norm
    raise ValueError(
        f"final norm of {type(model).__name__} not found: looked for a module named "
        f"{' or '.join(_NORM_NAMES)} under {', '.join(_BACKBONE_PATHS)}"
    )


def _text_config(model_config: PretrainedConfig) -> PretrainedConfig:
    get_text_config = getattr(model_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else model_config


def num_target_layers(model_config: PretrainedConfig) -> int:
    """Return the number of decoder layers, reading ``text_config`` for multimodal models."""
    text = _text_config(model_config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model_config).__name__} has no num_hidden_layers (nor text_config.num_hidden_layers)")


def hidden_size(model_config: PretrainedConfig) -> int:
    """Return the decoder's hidden size, reading ``text_config`` for multimodal models."""
    text = _text_config(model_config)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model_config).__name__} has no hidden_size (nor text_config.hidden_size)")


def validate_layer_ids(layer_ids: list[int], num_layers: int, key: str = "cache.layer_ids") -> None:
    """Check target layer ids for the draft: strictly increasing, each in [-1, num_layers - 2].

    -1 means the embedding output. The last layer is rejected because
    ``output_hidden_states`` returns its output after the final norm, while the
    draft is trained on raw decoder-layer outputs.
    """
    last = num_layers - 1
    allowed = f"[-1, {last - 1}] (-1 is the embedding output)"
    if not layer_ids:
        raise ConfigError(f"{key} is empty; list at least one target layer id in {allowed}")
    for previous, current in zip(layer_ids, layer_ids[1:], strict=False):
        if current <= previous:
            raise ConfigError(f"{key}={layer_ids} must be strictly increasing ({previous} then {current})")
    for layer_id in layer_ids:
        if layer_id == last:
            raise ConfigError(
                f"{key}={layer_ids} contains {layer_id}, the target's last layer: output_hidden_states returns "
                "that layer's output after the final norm, while the draft reads raw decoder-layer outputs; "
                f"use ids in {allowed}"
            )
        if not -1 <= layer_id <= last - 1:
            raise ConfigError(
                f"{key}={layer_ids} contains {layer_id}, outside {allowed} for a target with {num_layers} layers"
            )

"""DSpark / DFlash draft model for Qwen3 targets.

The shared block/anchor machinery and the training forward live in
``deepspec.drafts.dspark_backbone``; this module holds the Qwen3 layers: a
pre-norm Qwen3 decoder layer whose keys and values are ``[context ; block]``.
``build_draft`` also builds Gemma4 drafts (``deepspec.drafts.dspark_gemma4``),
choosing by the target config's ``model_type``.

Module and tensor names follow DeepSpec's ``Qwen3DSparkModel`` checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3MLP,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    repeat_kv,
    rotate_half,
)

from deepspec.config.schema import DraftConfig
from deepspec.drafts.dspark_backbone import (
    ContextKV,
    DSparkForwardOutput,
    DSparkModelBase,
    anchor_candidates,
    block_labels,
    build_block_attention_mask,
    dspark_config_fields,
    sample_anchor_positions,
    validate_draft_fields,
    validate_target_layer_ids,
)
from deepspec.drafts.dspark_gemma4 import GEMMA4_TARGET_MODEL_TYPES, build_gemma4_draft
from deepspec.drafts.from_target import instantiate_from_target

ARCHITECTURE = "Qwen3DSparkModel"

__all__ = [
    "ARCHITECTURE",
    "DSparkConfig",
    "DSparkForwardOutput",
    "DSparkModel",
    "Qwen3DSparkModel",
    "anchor_candidates",
    "attend",
    "block_labels",
    "build_block_attention_mask",
    "build_draft",
    "draft_kwargs_from_config",
    "sample_anchor_positions",
    "validate_dspark_config",
    "validate_target_layer_ids",
]


@strict
class DSparkConfig(Qwen3Config):
    """A copy of the target's Qwen3 config plus the draft's own fields (as in DeepSpec's ``config.json``)."""

    num_target_layers: int | None = None
    target_layer_ids: list[int] | None = None
    block_size: int = 7
    mask_token_id: int | None = None
    num_anchors: int = 512
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool | None = None
    markov_rank: int = 0
    markov_head_type: str | None = None


def validate_dspark_config(config: DSparkConfig) -> None:
    """Check the draft-specific fields and their combinations, naming the field and the fix."""
    validate_draft_fields(config)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, hd]`` by per-position ``cos``/``sin`` of shape ``[B, T, hd]``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """Scaled dot-product attention with a boolean mask (True = may attend).

    Query rows whose mask is all False return zeros with zero gradient (as
    flex attention does) instead of the NaN that softmax over no keys gives.
    """
    groups = query.shape[1] // key.shape[1]
    key = repeat_kv(key, groups)
    value = repeat_kv(value, groups)
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
    row_has_key = mask.any(dim=-1, keepdim=True)
    safe_mask = mask | ~row_has_key
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=safe_mask, dropout_p=dropout)
    return output * row_has_key.to(output.dtype)


class DSparkRotaryEmbedding(Qwen3RotaryEmbedding):
    """Qwen3 RoPE whose inverse frequencies stay float32 when the model is cast to a lower precision.

    A bf16 copy of the frequencies would shift the rotation angles of far
    positions. Keeping float32 also makes ``model.to(torch.bfloat16)`` equal to
    loading a bf16 checkpoint, because loading rebuilds the unsaved frequencies.
    """

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        float32_buffers = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, original in float32_buffers.items():
            self._buffers[name] = original.to(device=self._buffers[name].device, dtype=torch.float32)
        return self


class DSparkAttention(nn.Module):
    """Qwen3 attention whose keys/values are ``[context ; block]`` and whose queries are the block only."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def key_value(
        self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return rotated, normalised keys and values ``[B, kv_heads, T, hd]`` of ``states [B, T, H]``."""
        batch, length, _ = states.shape
        key = self.k_norm(self.k_proj(states).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        value = self.v_proj(states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(key, cos, sin), value

    def forward(
        self,
        hidden: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        query = self.q_norm(self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim)).transpose(1, 2)
        query = apply_rope(query, cos, sin)
        block_key, block_value = self.key_value(hidden, cos, sin)
        key = torch.cat([context_kv[0], block_key], dim=2)
        value = torch.cat([context_kv[1], block_value], dim=2)
        output = attend(query, key, value, mask, self.dropout if self.training else 0.0)
        return self.o_proj(output.transpose(1, 2).reshape(batch, length, -1))


class DSparkDecoderLayer(nn.Module):
    """Pre-norm Qwen3 layer: ``x + attn(input_layernorm(x))`` then ``+ mlp(post_attention_layernorm(x))``."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.self_attn = DSparkAttention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), context_kv, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3DSparkModel(DSparkModelBase):
    """The DSpark / DFlash draft for a Qwen3 target (``architectures: ["Qwen3DSparkModel"]``)."""

    config_class = DSparkConfig
    config: DSparkConfig
    _no_split_modules = ["DSparkDecoderLayer"]

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__(config)
        validate_dspark_config(config)
        num_features = len(config.target_layer_ids) * config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DSparkDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DSparkRotaryEmbedding(config)
        self.fc = nn.Linear(num_features, config.hidden_size, bias=False)
        self.hidden_norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._add_heads(config)
        self._finish_init()

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor) -> ContextKV:
        """Return each layer's context keys/values for ``context [B, S, H]`` at ``positions [B, S]``."""
        cos, sin = self.rotary_emb(context, positions)
        return [layer.self_attn.key_value(context, cos, sin) for layer in self.layers]

    def backbone(
        self,
        block_ids: torch.Tensor,
        positions: torch.Tensor,
        context_kv: ContextKV,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the draft layers over ``block_ids [B, Q]`` at ``positions [B, Q]``; return ``norm(x)`` ``[B, Q, H]``."""
        x = self.embed_tokens(block_ids)
        cos, sin = self.rotary_emb(x, positions)
        for layer, layer_kv in zip(self.layers, context_kv, strict=False):
            x = layer(x, layer_kv, cos, sin, mask)
        return self.norm(x)


DSparkModel = Qwen3DSparkModel


def _target_parts(target_model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Return the target's input embedding, output head and final norm, or raise naming what is missing."""
    config = getattr(target_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "qwen3":
        raise ValueError(
            f"build_draft supports Qwen3 and Gemma4 targets (config.model_type 'qwen3', "
            f"{', '.join(repr(name) for name in GEMMA4_TARGET_MODEL_TYPES)}), got model_type {model_type!r}; "
            "load the target with AutoModelForCausalLM from a Qwen3 or Gemma4 checkpoint"
        )
    embed = target_model.get_input_embeddings()
    head = target_model.get_output_embeddings()
    backbone = getattr(target_model, "model", None)
    norm = getattr(backbone, "norm", None)
    if embed is None or head is None or norm is None:
        raise ValueError(
            f"{type(target_model).__name__} lacks an input embedding, an LM head or model.norm; "
            "pass the causal-LM model (e.g. Qwen3ForCausalLM), not the bare backbone"
        )
    return embed, head, norm


def build_draft(
    target_model: nn.Module,
    *,
    layer_ids: list[int],
    block_size: int,
    num_layers: int,
    num_anchors: int,
    markov_rank: int,
    markov_head_type: str | None,
    enable_confidence_head: bool,
    confidence_head_with_markov: bool | None,
    mask_token_id: int,
    seed: int,
) -> DSparkModelBase:
    """Build a float32 draft for a Qwen3 or Gemma4 target (chosen by the target's ``config.model_type``).

    The draft config is a copy of the target's (same hidden size, heads, RoPE,
    vocabulary, ...) with the draft's depth and fields. ``embed_tokens`` and
    ``lm_head`` are frozen copies of the target's. The other weights come from
    the Hugging Face initialisation under ``torch.manual_seed(seed)``, and the
    global RNG state is restored afterwards.
    """
    if getattr(getattr(target_model, "config", None), "model_type", None) in GEMMA4_TARGET_MODEL_TYPES:
        return build_gemma4_draft(
            target_model,
            layer_ids=layer_ids,
            block_size=block_size,
            num_layers=num_layers,
            num_anchors=num_anchors,
            markov_rank=markov_rank,
            markov_head_type=markov_head_type,
            enable_confidence_head=enable_confidence_head,
            confidence_head_with_markov=confidence_head_with_markov,
            mask_token_id=mask_token_id,
            seed=seed,
        )
    embed, head, norm = _target_parts(target_model)
    target_config = target_model.config
    num_target_layers = target_config.num_hidden_layers
    validate_target_layer_ids(list(layer_ids), num_target_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")

    values = target_config.to_dict()
    # The target's layer_types has one entry per target layer and fails validation
    # once num_hidden_layers changes, so it is replaced, not edited.
    values.pop("layer_types", None)
    for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map"):
        values.pop(key, None)
    values.update(
        architectures=[ARCHITECTURE],
        num_hidden_layers=num_layers,
        layer_types=["full_attention"] * num_layers,
        **dspark_config_fields(
            num_target_layers=num_target_layers,
            layer_ids=layer_ids,
            block_size=block_size,
            mask_token_id=mask_token_id,
            num_anchors=num_anchors,
            enable_confidence_head=enable_confidence_head,
            confidence_head_with_markov=confidence_head_with_markov,
            markov_rank=markov_rank,
            markov_head_type=markov_head_type,
        ),
    )
    config = DSparkConfig(**values)
    return instantiate_from_target(Qwen3DSparkModel, config, seed=seed, embed=embed, head=head, norm=norm)


def draft_kwargs_from_config(
    draft: DraftConfig, *, layer_ids: list[int], mask_token_id: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Map a pipeline ``DraftConfig`` (plus the cached layer ids) to ``build_draft`` keyword arguments.

    ``draft.mask_token_id`` wins over ``mask_token_id`` (the tokenizer's).
    """
    # The config resolves algorithm defaults: DFlash has markov_rank 0 and no confidence head.
    markov_rank, enable_confidence = draft.markov_rank, draft.confidence_head_alpha > 0
    resolved_mask = draft.mask_token_id if draft.mask_token_id is not None else mask_token_id
    if resolved_mask is None:
        raise ValueError(
            "no mask token: set draft.mask_token_id or pass the tokenizer's mask token id "
            "(any id the target never produces, e.g. an unused reserved token)"
        )
    return {
        "layer_ids": list(layer_ids),
        "block_size": draft.block_size,
        "num_layers": draft.num_layers,
        "num_anchors": draft.num_anchors,
        "markov_rank": markov_rank,
        "markov_head_type": draft.markov_head_type if markov_rank > 0 else None,
        "enable_confidence_head": enable_confidence,
        "confidence_head_with_markov": draft.confidence_head_with_markov if enable_confidence else None,
        "mask_token_id": resolved_mask,
        "seed": seed,
    }

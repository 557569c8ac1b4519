"""DSpark / DFlash draft model for Gemma4 targets (``architectures: ["Gemma4DSparkModel"]``).

The blocks, anchors, heads and loss are those of the Qwen3 draft, and the
layers are Gemma4's (see ``deepspec.drafts.gemma4_layers``). Three more things
differ. The token embedding is multiplied by sqrt(hidden_size). The draft
config is a copy of the target's ``text_config`` plus ``target_model_type``
and ``target_text_model_type``. Both the draft logits and the aligned target
logits are soft-capped with ``final_logit_softcapping``, and the Markov bias
is added after the cap.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.gemma4 import Gemma4TextConfig

from deepspec.drafts.dspark_backbone import (
    ContextKV,
    DSparkModelBase,
    dspark_config_fields,
    validate_draft_fields,
    validate_target_layer_ids,
)
from deepspec.drafts.from_target import instantiate_from_target
from deepspec.drafts.gemma4_layers import (
    FULL_ATTENTION,
    Gemma4RMSNorm,
    Gemma4RotaryEmbedding,
    Gemma4SandwichLayer,
    global_attention_sizes,
    layer_shape,
    soft_cap,
)

GEMMA4_ARCHITECTURE = "Gemma4DSparkModel"
# Outer (multimodal) and text config model types of Gemma4 targets.
GEMMA4_TARGET_MODEL_TYPES = ("gemma4", "gemma4_unified", "gemma4_text", "gemma4_unified_text")
GEMMA4_TEXT_MODEL_TYPES = ("gemma4_text", "gemma4_unified_text")


class ReferenceLayoutMixin:
    """Serialise a Gemma4 draft config in DeepSpec's flat ``config.json`` layout (for DSpark and Eagle3)."""

    def __post_init__(self, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("global_head_dim", self.global_head_dim)
        kwargs.setdefault("num_global_key_value_heads", self.num_global_key_value_heads)
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        reference_config_layout(output)
        return output

    def _update_heterogeneous_to_dict_output(self, d: dict[str, Any]) -> None:
        # Also used by to_diff_dict, which writes config.json.
        super()._update_heterogeneous_to_dict_output(d)
        reference_config_layout(d)


@strict
class Gemma4DSparkConfig(ReferenceLayoutMixin, Gemma4TextConfig):
    """A copy of the target's Gemma4 text config plus the draft's own fields (as in DeepSpec's ``config.json``)."""

    num_target_layers: int | None = None
    target_layer_ids: list[int] | None = None
    block_size: int = 7
    mask_token_id: int | None = None
    num_anchors: int = 512
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool | None = None
    markov_rank: int = 0
    markov_head_type: str | None = None
    target_model_type: str | None = None
    target_text_model_type: str | None = None
    # Gemma4TextConfig turns these two into per_layer_config; they are kept so that
    # config.json has DeepSpec's flat layout.
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None


def reference_config_layout(values: dict[str, Any]) -> None:
    """Rewrite serialised Gemma4 draft config values in place into the layout of DeepSpec's ``config.json``."""
    values.pop("per_layer_config", None)
    rope = values.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get(FULL_ATTENTION), dict):
        # transformers 5.10.2 (DeepSpec's pinned version) writes these two flat keys beside the
        # per-layer-type entries.
        rope.setdefault("rope_theta", None)
        rope.setdefault("rope_type", "default")


def validate_gemma4_dspark_config(config: Gemma4DSparkConfig) -> None:
    """Check the draft fields plus the Gemma4 features the draft does not implement."""
    validate_draft_fields(config)
    if config.enable_moe_block:
        raise ValueError("enable_moe_block must be false: Gemma4 DSpark drafts have no mixture-of-experts block")
    if config.hidden_size_per_layer_input:
        raise ValueError(
            f"hidden_size_per_layer_input must be 0 (per-layer inputs are not supported by Gemma4 drafts), "
            f"got {config.hidden_size_per_layer_input}"
        )


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by ``scale`` (sqrt(hidden_size) for Gemma), rounded to the weight dtype first."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, device=self.weight.device).to(self.weight.dtype)
        return super().forward(input_ids) * scale


class Gemma4DSparkDecoderLayer(Gemma4SandwichLayer):
    """Gemma4 sandwich layer whose block queries attend over ``[context ; block]`` keys and values."""

    def forward(
        self,
        x: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attention = self.self_attn
        normed = self.input_layernorm(x)
        query = attention.query(normed, cos, sin)
        block_key, block_value = attention.key_value(normed, cos, sin)
        key = torch.cat([context_kv[0], block_key], dim=2)
        value = torch.cat([context_kv[1], block_value], dim=2)
        return self.finish(x, attention.attend(query, key, value, mask))


class Gemma4DSparkModel(DSparkModelBase):
    """The DSpark / DFlash draft for a Gemma4 target."""

    config_class = Gemma4DSparkConfig
    config: Gemma4DSparkConfig
    _no_split_modules = ["Gemma4DSparkDecoderLayer"]

    def __init__(self, config: Gemma4DSparkConfig) -> None:
        super().__init__(config)
        validate_gemma4_dspark_config(config)
        shape = layer_shape(config)
        hidden = config.hidden_size
        num_features = len(config.target_layer_ids) * hidden
        self.embed_tokens = ScaledEmbedding(config.vocab_size, hidden, config.pad_token_id, hidden**0.5)
        self.layers = nn.ModuleList(Gemma4DSparkDecoderLayer(shape) for _ in range(config.num_hidden_layers))
        self.norm = Gemma4RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma4RotaryEmbedding(config)
        self.fc = nn.Linear(num_features, hidden, bias=False)
        self.hidden_norm = Gemma4RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self._add_heads(config)
        self._finish_init()

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return ``tanh(lm_head(hidden) / c) * c`` with ``c = final_logit_softcapping`` (no cap when unset)."""
        return soft_cap(self.lm_head(hidden), self.config.final_logit_softcapping)

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor) -> ContextKV:
        """Return each layer's context keys/values for ``context [B, S, H]`` at ``positions [B, S]``."""
        cos, sin = self.rotary_emb(positions, context.dtype)
        return [layer.self_attn.key_value(context, cos, sin) for layer in self.layers]

    def backbone(
        self, block_ids: torch.Tensor, positions: torch.Tensor, context_kv: ContextKV, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the draft layers over ``block_ids [B, Q]`` at ``positions [B, Q]``; return ``norm(x)`` ``[B, Q, H]``."""
        x = self.embed_tokens(block_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer, layer_kv in zip(self.layers, context_kv, strict=False):
            x = layer(x, layer_kv, cos, sin, mask)
        return self.norm(x)


def _text_backbone(target_model: nn.Module) -> nn.Module | None:
    """Return the text decoder of a Gemma4 causal LM (``model``) or multimodal model (``model.language_model``)."""
    outer = getattr(target_model, "model", None)
    language_model = getattr(outer, "language_model", None)
    return language_model if isinstance(language_model, nn.Module) else outer


def build_gemma4_draft(
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
) -> Gemma4DSparkModel:
    """Build a float32 draft for a Gemma4 target (``Gemma4ForConditionalGeneration`` or ``Gemma4ForCausalLM``).

    The draft config is a copy of the target's text config with the draft's
    depth and fields. ``embed_tokens`` and ``lm_head`` are frozen copies of
    the target's, and the final norm starts from the target's. The other
    weights come from the Hugging Face initialisation under
    ``torch.manual_seed(seed)``, and the global RNG state is restored afterwards.
    """
    target_config = target_model.config
    text_config = target_config.get_text_config()
    if (
        target_config.model_type not in GEMMA4_TARGET_MODEL_TYPES
        or text_config.model_type not in GEMMA4_TEXT_MODEL_TYPES
    ):
        raise ValueError(
            f"build_gemma4_draft needs a Gemma4 target: config.model_type {target_config.model_type!r} must be one "
            f"of {GEMMA4_TARGET_MODEL_TYPES} and its text config's model_type {text_config.model_type!r} one of "
            f"{GEMMA4_TEXT_MODEL_TYPES}"
        )
    embed = target_model.get_input_embeddings()
    head = target_model.get_output_embeddings()
    norm = getattr(_text_backbone(target_model), "norm", None)
    if embed is None or head is None or norm is None:
        raise ValueError(
            f"{type(target_model).__name__} lacks an input embedding, an LM head or a final norm; pass "
            "Gemma4ForConditionalGeneration or Gemma4ForCausalLM, not the bare text model"
        )
    num_target_layers = text_config.num_hidden_layers
    validate_target_layer_ids(list(layer_ids), num_target_layers)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")

    values = text_config.to_dict()
    values["global_head_dim"], global_kv_heads = global_attention_sizes(text_config)
    # NOTE: without attention_k_eq_v, recent transformers drop num_global_key_value_heads
    # from the target config; the draft does not use it then, so it is left unset.
    values["num_global_key_value_heads"] = global_kv_heads if text_config.attention_k_eq_v else None
    # The target's layer_types has one entry per target layer; every draft layer is a global one.
    for key in (
        "layer_types",
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "auto_map",
        "per_layer_config",
    ):
        values.pop(key, None)
    values.update(
        architectures=[GEMMA4_ARCHITECTURE],
        num_hidden_layers=num_layers,
        layer_types=[FULL_ATTENTION] * num_layers,
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
        target_model_type=target_config.model_type,
        target_text_model_type=text_config.model_type,
    )
    config = Gemma4DSparkConfig(**values)
    # Both the target's and the draft's Gemma4 norms use the weight as is, so copying it keeps the scale.
    return instantiate_from_target(Gemma4DSparkModel, config, seed=seed, embed=embed, head=head, norm=norm)

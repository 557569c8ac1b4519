"""Gemma4 decoder-layer pieces for draft models, shared by the DSpark/DFlash and the Eagle3 drafts.

What differs from a Qwen3 draft layer:

- RMSNorm is ``x * (mean(x^2) + eps)^-1/2 * w`` with ``w`` used as is (not
  ``1 + w``), computed in float32; the value norm has no scale at all.
- Attention runs over ``global_head_dim`` with q_norm, k_norm and a
  scale-free v_norm, and its scale is 1.0 (the norms already bound q.k).
- With ``attention_k_eq_v`` there is no ``v_proj``: the values are the raw
  ``k_proj`` output (before k_norm and RoPE), then v_norm, and the number of
  KV heads is ``num_global_key_value_heads``.
- RoPE may be "proportional": only the first ``int(partial_rotary_factor *
  head_dim / 2)`` frequencies are non-zero, so the other dimensions pass
  through unrotated.
- The layer is a sandwich: ``x + post_attention_layernorm(attn(...))`` then
  ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``, then
  ``x * layer_scalar`` (a persistent buffer of ones).
- The MLP is ``down(act(gate(x)) * up(x))`` with the config's
  ``hidden_activation`` (gelu_pytorch_tanh for Gemma4).
- Logits are soft-capped: ``tanh(z / c) * c``.

Tensor names match DeepSpec's Gemma4 draft checkpoints. The projection input
width is a constructor argument because Eagle3 feeds ``[embedding ; hidden]``
(2H) into q/k/v while DSpark feeds H.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

# The RoPE parameters of global ("full_attention") layers; every draft layer is one.
FULL_ATTENTION = "full_attention"


class Gemma4RMSNorm(nn.Module):
    """``x * (mean(x^2) + eps)^-1/2``, times ``weight`` as is when ``with_scale``; computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        self.weight: nn.Parameter | None = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.pow(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            normed = normed * self.weight.float()
        return normed.type_as(x)


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Return ``tanh(logits / cap) * cap``, or ``logits`` unchanged when ``cap`` is None or 0."""
    if not cap:
        return logits
    return torch.tanh(logits / cap) * cap


def rope_inv_freq(rope_parameters: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Return the float32 inverse frequencies ``[head_dim // 2]`` of one layer type's RoPE parameters.

    ``default``: ``theta^(-2i/d)`` for every i. ``proportional``: the first
    ``int(partial_rotary_factor * d / 2)`` entries as in default, the rest 0.
    Both divide by ``factor`` when it is given.
    """
    rope_type = rope_parameters.get("rope_type", "default")
    theta = rope_parameters.get("rope_theta")
    if theta is None:
        raise ValueError(f"RoPE parameters {rope_parameters} lack rope_theta; set it in the config's rope_parameters")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    if rope_type == "proportional":
        rotated = int(float(rope_parameters.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv_freq[rotated:] = 0.0
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported by Gemma4 drafts; use 'default' or 'proportional'")
    return inv_freq / float(rope_parameters.get("factor", 1.0))


class Gemma4RotaryEmbedding(nn.Module):
    """The global-layer RoPE of a Gemma4 text config, over its attention head dim.

    ``inv_freq`` is not saved and stays float32 under dtype casts.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.rope_parameters = full_attention_rope(config)
        self.head_dim = layer_shape(config).head_dim
        self.register_buffer("inv_freq", rope_inv_freq(self.rope_parameters, self.head_dim), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A bf16 copy of the frequencies would shift the rotation angles of far positions.
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)``, each ``[B, T, head_dim]`` in ``dtype``, for integer ``positions [B, T]``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, hd]`` (halves layout) by ``cos``/``sin`` of shape ``[B, T, hd]``."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of ``query [B, nH, Q, hd]`` over ``key``/``value [B, nKV, K, hd]`` with a boolean mask.

    KV head j serves query heads ``j*g .. j*g+g-1``. ``mask`` (True = may
    attend) broadcasts to ``[B, nH, Q, K]``. Query rows that may attend to
    nothing return zeros with zero gradient instead of NaN.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale)
    row_has_key = mask.any(dim=-1, keepdim=True)
    safe_mask = mask | ~row_has_key
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=safe_mask, dropout_p=dropout, scale=scale)
    return output * row_has_key.to(output.dtype)


@dataclass(frozen=True)
class Gemma4LayerShape:
    """The sizes of one Gemma4 draft layer, read from a ``gemma4_text`` config by ``layer_shape``."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    k_eq_v: bool
    rms_norm_eps: float
    hidden_activation: str
    attention_bias: bool
    attention_dropout: float


def global_attention_sizes(config: Any) -> tuple[int, int]:
    """Return ``(head_dim, num_kv_heads)`` of a Gemma4 text config's global ("full_attention") layers.

    Head dim is ``global_head_dim``; KV heads are ``num_global_key_value_heads``
    with ``attention_k_eq_v``, else ``num_key_value_heads``. Recent
    transformers versions store both in ``per_layer_config``, which already
    applies these rules; older configs carry the flat fields.
    """
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer is not None:
        view = per_layer[FULL_ATTENTION]
        return view.head_dim, view.num_key_value_heads
    head_dim = getattr(config, "global_head_dim", None) or config.head_dim
    num_kv_heads = config.num_key_value_heads
    if getattr(config, "attention_k_eq_v", False):
        num_kv_heads = getattr(config, "num_global_key_value_heads", None) or num_kv_heads
    return head_dim, num_kv_heads


def layer_shape(config: Any) -> Gemma4LayerShape:
    """Return the sizes of a global-attention layer of a Gemma4 text config (see ``global_attention_sizes``)."""
    head_dim, num_kv_heads = global_attention_sizes(config)
    return Gemma4LayerShape(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        k_eq_v=bool(getattr(config, "attention_k_eq_v", False)),
        rms_norm_eps=config.rms_norm_eps,
        hidden_activation=config.hidden_activation,
        attention_bias=bool(getattr(config, "attention_bias", False)),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
    )


def full_attention_rope(config: Any) -> dict[str, Any]:
    """Return the ``full_attention`` RoPE parameters of a Gemma4 text config (or its flat parameters)."""
    parameters = config.rope_parameters or {}
    nested = parameters.get(FULL_ATTENTION)
    return dict(nested) if isinstance(nested, dict) else dict(parameters)


class Gemma4Attention(nn.Module):
    """Gemma4 attention with q/k/v norms, scale 1.0 and optional shared keys and values.

    The module only projects and attends; the caller decides which states
    give the queries and which the keys/values (DSpark: block queries over
    ``[context ; block]`` keys).
    """

    def __init__(self, shape: Gemma4LayerShape, input_size: int | None = None) -> None:
        super().__init__()
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.k_eq_v = shape.k_eq_v
        self.dropout = shape.attention_dropout
        self.scale = 1.0
        width = input_size or shape.hidden_size
        bias = shape.attention_bias
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj: nn.Linear | None = None
        if not self.k_eq_v:
            self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, shape.hidden_size, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, eps=shape.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(self.head_dim, eps=shape.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(self.head_dim, eps=shape.rms_norm_eps, with_scale=False)

    def query(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Return normalised, rotated queries ``[B, nH, T, hd]`` of ``states [B, T, input_size]``."""
        batch, length, _ = states.shape
        query = self.q_norm(self.q_proj(states).view(batch, length, self.num_heads, self.head_dim))
        return apply_rope(query.transpose(1, 2), cos, sin)

    def key_value(
        self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return rotated, normalised keys and normalised values ``[B, nKV, T, hd]`` of ``states``."""
        batch, length, _ = states.shape
        raw_key = self.k_proj(states).view(batch, length, self.num_kv_heads, self.head_dim)
        raw_value = raw_key if self.v_proj is None else self.v_proj(states).view(raw_key.shape)
        key = apply_rope(self.k_norm(raw_key).transpose(1, 2), cos, sin)
        return key, self.v_norm(raw_value).transpose(1, 2)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attend and project back: return ``o_proj(attention)`` ``[B, Q, hidden]``."""
        dropout = self.dropout if self.training else 0.0
        output = masked_attention(query, key, value, mask, self.scale, dropout)
        batch, _, length, _ = output.shape
        return self.o_proj(output.transpose(1, 2).reshape(batch, length, -1))


class Gemma4MLP(nn.Module):
    """``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        if activation not in ACT2FN:
            raise ValueError(f"hidden_activation {activation!r} is unknown; use e.g. 'gelu_pytorch_tanh'")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Gemma4SandwichLayer(nn.Module):
    """The norms, attention, MLP and ``layer_scalar`` of a Gemma4 draft layer.

    Subclasses run the attention their way and call ``finish`` with the
    residual stream and the attention output.
    """

    def __init__(self, shape: Gemma4LayerShape, input_size: int | None = None) -> None:
        super().__init__()
        eps = shape.rms_norm_eps
        self.self_attn = Gemma4Attention(shape, input_size)
        self.mlp = Gemma4MLP(shape.hidden_size, shape.intermediate_size, shape.hidden_activation)
        self.input_layernorm = Gemma4RMSNorm(shape.hidden_size, eps=eps)
        self.post_attention_layernorm = Gemma4RMSNorm(shape.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(shape.hidden_size, eps=eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(shape.hidden_size, eps=eps)
        self.register_buffer("layer_scalar", torch.ones(1), persistent=True)

    def finish(self, residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """Return ``(r + post_ff(mlp(pre_ff(r)))) * layer_scalar`` with ``r = residual + post_attn(attention)``."""
        x = residual + self.post_attention_layernorm(attention_output)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar

"""Decoder layers of the Eagle3 drafts and their cached attention.

An Eagle3 layer reads two streams: the token embeddings and a hidden stream
(target features projected by ``fc``, or the previous step's output). Its
q/k/v projections take ``[input_layernorm(embeds) ; hidden_norm(hidden)]``
(2H wide, embedding first) and its residual is the un-normalised hidden
stream. Every layer returns its keys/values so that later TTT steps and
drafting steps can attend to them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from deepspec.drafts.dspark import apply_rope
from deepspec.drafts.gemma4_layers import Gemma4LayerShape, Gemma4RMSNorm, Gemma4SandwichLayer, masked_attention

KeyValue = tuple[torch.Tensor, torch.Tensor]  # keys and values [B, kv_heads, P, hd]


def attend_cached(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past: KeyValue | None,
    mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, KeyValue]:
    """Attend ``query [B, heads, Q, hd]`` to the cached plus new keys; return the output and the extended cache.

    ``mask`` is bool ``[B, 1, Q, P+Q]`` (True = may attend) or None (no
    restriction). Query rows with no visible key return zeros with zero
    gradient, as flex attention does, instead of the NaN of an empty softmax.
    """
    if past is not None:
        key = torch.cat([past[0], key], dim=2)
        value = torch.cat([past[1], value], dim=2)
    return masked_attention(query, key, value, mask, scaling), (key, value)


class Qwen3Eagle3Attention(nn.Module):
    """Qwen3 attention whose q/k/v projections read the ``2H``-wide ``[embedding ; hidden]`` input."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, bias: bool
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(2 * hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(head_dim, eps=eps)
        self.k_norm = Qwen3RMSNorm(head_dim, eps=eps)

    def forward(
        self,
        inputs: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: KeyValue | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        batch, length, _ = inputs.shape
        query = self.q_norm(self.q_proj(inputs).view(batch, length, self.num_heads, self.head_dim)).transpose(1, 2)
        key = self.k_norm(self.k_proj(inputs).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        value = self.v_proj(inputs).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        output, cache = attend_cached(query, key, value, past, mask, self.scaling)
        return self.o_proj(output.transpose(1, 2).reshape(batch, length, -1)), cache


class Qwen3Eagle3DecoderLayer(nn.Module):
    """Pre-norm Qwen3 layer over ``[input_layernorm(embeds) ; hidden_norm(hidden)]`` with ``hidden`` as residual."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = Qwen3Eagle3Attention(
            hidden_size=hidden,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim or hidden // config.num_attention_heads,
            eps=config.rms_norm_eps,
            bias=config.attention_bias,
        )
        self.mlp = Qwen3MLP(config)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.input_layernorm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: KeyValue | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        inputs = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attention, cache = self.self_attn(inputs, cos, sin, past, mask)
        hidden = hidden + attention
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), cache


class Gemma4Eagle3DecoderLayer(Gemma4SandwichLayer):
    """Gemma4 sandwich layer over ``[input_layernorm(embeds) ; hidden_norm(hidden)]`` with ``hidden`` as residual."""

    def __init__(self, shape: Gemma4LayerShape) -> None:
        super().__init__(shape, input_size=2 * shape.hidden_size)
        self.hidden_norm = Gemma4RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: KeyValue | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        inputs = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        attention = self.self_attn
        query = attention.query(inputs, cos, sin)
        key, value = attention.key_value(inputs, cos, sin)
        output, cache = attend_cached(query, key, value, past, mask, attention.scale)
        batch, _, length, _ = output.shape
        projected = attention.o_proj(output.transpose(1, 2).reshape(batch, length, -1))
        return self.finish(hidden, projected), cache

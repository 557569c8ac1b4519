"""Small hand-checkable tests of the Gemma4 draft layer pieces."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.gemma4 import Gemma4TextConfig

from deepspec.drafts.gemma4_layers import (
    Gemma4Attention,
    Gemma4LayerShape,
    Gemma4RMSNorm,
    Gemma4RotaryEmbedding,
    Gemma4SandwichLayer,
    apply_rope,
    layer_shape,
    masked_attention,
    rope_inv_freq,
    soft_cap,
)

PROPORTIONAL = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}


def shape(k_eq_v: bool, num_kv_heads: int = 1) -> Gemma4LayerShape:
    return Gemma4LayerShape(
        hidden_size=8,
        intermediate_size=16,
        num_heads=2,
        num_kv_heads=num_kv_heads,
        head_dim=4,
        k_eq_v=k_eq_v,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        attention_dropout=0.0,
    )


def text_config(k_eq_v: bool) -> Gemma4TextConfig:
    return Gemma4TextConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=4,
        global_head_dim=8,
        num_global_key_value_heads=1,
        attention_k_eq_v=k_eq_v,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": PROPORTIONAL,
        },
    )


def test_rms_norm_uses_weight_as_is() -> None:
    norm = Gemma4RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5]))
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    expected = torch.tensor([[2.0 * 3.0, 0.5 * 4.0]]) / math.sqrt(12.5)
    torch.testing.assert_close(norm(x), expected)
    with torch.no_grad():
        norm.weight.zero_()
    assert torch.equal(norm(x), torch.zeros_like(x)), "a zero weight must zero the output (w, not 1 + w)"


def test_value_norm_has_no_scale() -> None:
    norm = Gemma4RMSNorm(4, eps=0.0, with_scale=False)
    assert list(norm.parameters()) == []
    x = torch.tensor([[1.0, -1.0, 3.0, -3.0]])  # mean square 5
    torch.testing.assert_close(norm(x), x / math.sqrt(5.0))


def test_proportional_rope_frequencies() -> None:
    inv_freq = rope_inv_freq(PROPORTIONAL, 32)
    assert inv_freq.shape == (16,)
    # int(0.25 * 32 / 2) = 4 rotated frequencies theta^(-2i/32), the other 12 are zero.
    expected_head = torch.tensor([1e6 ** (-2 * i / 32) for i in range(4)], dtype=torch.float32)
    torch.testing.assert_close(inv_freq[:4], expected_head)
    assert torch.all(inv_freq[4:] == 0)
    assert torch.all(rope_inv_freq({"rope_type": "default", "rope_theta": 1e6}, 32) > 0)


def test_proportional_rope_leaves_tail_dimensions_unrotated() -> None:
    rotary = Gemma4RotaryEmbedding(text_config(k_eq_v=False))
    assert rotary.head_dim == 8  # global_head_dim, not head_dim
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8)  # [B, heads, T, hd]
    cos, sin = rotary(torch.tensor([[7]]), torch.float32)
    rotated = apply_rope(x, cos, sin)
    # int(0.25 * 8 / 2) = 1 frequency: dims 0 and 4 rotate as a pair, the rest pass through.
    unrotated = [1, 2, 3, 5, 6, 7]
    assert torch.equal(rotated[..., unrotated], x[..., unrotated])
    angle = torch.tensor(7.0)
    torch.testing.assert_close(rotated[0, 0, 0, 0], 1.0 * angle.cos() - 5.0 * angle.sin())
    torch.testing.assert_close(rotated[0, 0, 0, 4], 5.0 * angle.cos() + 1.0 * angle.sin())


def test_rope_frequencies_stay_float32() -> None:
    rotary = Gemma4RotaryEmbedding(text_config(k_eq_v=False)).to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32


def test_unknown_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        rope_inv_freq({"rope_type": "yarn", "rope_theta": 1e4}, 8)


def test_k_eq_v_shares_keys_and_values() -> None:
    attention = Gemma4Attention(shape(k_eq_v=True))
    assert attention.v_proj is None
    assert not any(name.startswith("v_proj") for name in attention.state_dict())
    states = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    position_zero = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)  # cos 1, sin 0: no rotation
    key, value = attention.key_value(states, *position_zero)
    # k_norm starts with weight 1, so K and V are the same normalised k_proj output.
    torch.testing.assert_close(key, value)
    with torch.no_grad():
        attention.k_norm.weight.fill_(2.0)
    key, value = attention.key_value(states, *position_zero)
    torch.testing.assert_close(key, 2.0 * value)


def test_separate_values_without_k_eq_v() -> None:
    attention = Gemma4Attention(shape(k_eq_v=False, num_kv_heads=2))
    assert attention.v_proj is not None
    states = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    key, value = attention.key_value(states, torch.ones(1, 3, 4), torch.zeros(1, 3, 4))
    assert key.shape == value.shape == (1, 2, 3, 4)
    assert not torch.allclose(key, value)


def test_projection_input_width_is_configurable() -> None:
    attention = Gemma4Attention(shape(k_eq_v=False), input_size=16)
    assert attention.q_proj.in_features == attention.k_proj.in_features == attention.v_proj.in_features == 16
    assert attention.o_proj.out_features == 8


def test_masked_attention_unscaled() -> None:
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 2, 2, 4, generator=generator)
    key = torch.randn(1, 1, 3, 4, generator=generator)
    value = torch.randn(1, 1, 3, 4, generator=generator)
    mask = torch.tensor([[True, True, False], [False, False, False]]).view(1, 1, 2, 3)
    output = masked_attention(query, key, value, mask, scale=1.0)
    scores = query[:, :, 0] @ key[0, 0].T  # no 1/sqrt(d)
    scores[..., 2] = float("-inf")
    expected = torch.softmax(scores, dim=-1) @ value[0, 0]
    torch.testing.assert_close(output[:, :, 0], expected)
    assert torch.equal(output[:, :, 1], torch.zeros_like(output[:, :, 1]))


def test_soft_cap() -> None:
    logits = torch.tensor([-100.0, 0.0, 5.0, 100.0])
    capped = soft_cap(logits, 10.0)
    torch.testing.assert_close(capped, torch.tanh(logits / 10.0) * 10.0)
    assert capped.abs().max() <= 10.0
    assert soft_cap(logits, None) is logits


def test_layer_scalar_multiplies_the_layer_output() -> None:
    layer = Gemma4SandwichLayer(shape(k_eq_v=True))
    assert "layer_scalar" in layer.state_dict()
    residual = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(2))
    attention_output = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(3))
    full = layer.finish(residual, attention_output)
    with torch.no_grad():
        layer.layer_scalar.fill_(0.5)
    torch.testing.assert_close(layer.finish(residual, attention_output), 0.5 * full)


@pytest.mark.parametrize(("k_eq_v", "kv_heads"), [(True, 1), (False, 2)])
def test_layer_shape_reads_global_attention_sizes(k_eq_v: bool, kv_heads: int) -> None:
    sizes = layer_shape(text_config(k_eq_v))
    assert sizes.head_dim == 8
    assert sizes.num_kv_heads == kv_heads
    assert sizes.k_eq_v is k_eq_v

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.targets.capture import _first_tensor, capture_hidden_states

NUM_LAYERS = 3
HIDDEN = 32


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=97,
        hidden_size=HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config).eval()


def _hook_count(model: Qwen3ForCausalLM) -> int:
    # transformers installs hooks of its own to record outputs, so tests compare counts before and after.
    return sum(len(module._forward_hooks) for module in model.modules())


@pytest.mark.parametrize("layer_ids", [[-1, 0, 1], [1], [0, 1]])
def test_capture_matches_output_hidden_states(model: Qwen3ForCausalLM, layer_ids: list[int]) -> None:
    hooks_before = _hook_count(model)
    input_ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        target_hidden, last_hidden = capture_hidden_states(model, input_ids, attention_mask, layer_ids)
    # Checked before the reference call, which lets transformers add its own output-recording hooks.
    assert _hook_count(model) == hooks_before
    with torch.inference_mode():
        reference = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        normed = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    assert target_hidden.shape == (2, 9, len(layer_ids) * HIDDEN)
    assert last_hidden.shape == (2, 9, HIDDEN)
    expected = torch.cat([reference.hidden_states[layer_id + 1] for layer_id in layer_ids], dim=-1)
    torch.testing.assert_close(target_hidden, expected, rtol=0, atol=0)
    torch.testing.assert_close(last_hidden, normed, rtol=0, atol=0)
    # output_hidden_states replaces the last layer's output with the normed state.
    torch.testing.assert_close(last_hidden, reference.hidden_states[-1], rtol=0, atol=0)


def test_capture_embedding_is_hidden_states_zero(model: Qwen3ForCausalLM) -> None:
    input_ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        target_hidden, _ = capture_hidden_states(model, input_ids, torch.ones_like(input_ids), [-1])
        reference = model(input_ids=input_ids, output_hidden_states=True)
    torch.testing.assert_close(target_hidden, reference.hidden_states[0], rtol=0, atol=0)


def test_capture_concatenates_in_layer_order(model: Qwen3ForCausalLM) -> None:
    input_ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        both, _ = capture_hidden_states(model, input_ids, mask, [0, 1])
        first, _ = capture_hidden_states(model, input_ids, mask, [0])
        second, _ = capture_hidden_states(model, input_ids, mask, [1])
    torch.testing.assert_close(both[..., :HIDDEN], first, rtol=0, atol=0)
    torch.testing.assert_close(both[..., HIDDEN:], second, rtol=0, atol=0)


def test_capture_right_padding_keeps_real_positions(model: Qwen3ForCausalLM) -> None:
    generator = torch.Generator().manual_seed(4)
    short = torch.randint(0, 97, (1, 4), generator=generator)
    long = torch.randint(0, 97, (1, 8), generator=generator)
    batch = torch.zeros(2, 8, dtype=torch.int64)
    batch[0, :4] = short[0]
    batch[1] = long[0]
    mask = torch.tensor([[1] * 4 + [0] * 4, [1] * 8])
    with torch.inference_mode():
        padded_hidden, padded_last = capture_hidden_states(model, batch, mask, [0, 1])
        alone_hidden, alone_last = capture_hidden_states(model, short, torch.ones_like(short), [0, 1])
    torch.testing.assert_close(padded_hidden[0, :4], alone_hidden[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_last[0, :4], alone_last[0], rtol=1e-5, atol=1e-5)


def test_capture_removes_hooks_when_forward_fails(model: Qwen3ForCausalLM) -> None:
    hooks_before = _hook_count(model)
    out_of_vocab = torch.full((1, 3), 500, dtype=torch.int64)
    with pytest.raises(IndexError):
        capture_hidden_states(model, out_of_vocab, torch.ones_like(out_of_vocab), [0, 1])
    assert _hook_count(model) == hooks_before


def test_capture_rejects_out_of_range_layer(model: Qwen3ForCausalLM) -> None:
    hooks_before = _hook_count(model)
    input_ids = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="layer id 3 is out of range .* 3 decoder layers"):
        capture_hidden_states(model, input_ids, torch.ones_like(input_ids), [0, 3])
    with pytest.raises(ValueError, match="layer_ids is empty"):
        capture_hidden_states(model, input_ids, torch.ones_like(input_ids), [])
    assert _hook_count(model) == hooks_before


def test_first_tensor_accepts_tensor_and_tuple() -> None:
    tensor = torch.ones(2)
    assert _first_tensor(tensor) is tensor
    assert _first_tensor((tensor, None)) is tensor
    with pytest.raises(TypeError, match="dict"):
        _first_tensor({"hidden": tensor})

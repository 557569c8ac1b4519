"""A tiny random Qwen3 target shared by the speculative-decoding tests."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

VOCAB = 48
HIDDEN = 32
LAYER_IDS = [-1, 0]


def build_target(seed: int = 0) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        # Larger output weights make next-token distributions peaked: a few likely tokens per context and
        # clear greedy choices, far from float-rounding ties.
        model.lm_head.weight.normal_(0.0, 0.6)
    return model

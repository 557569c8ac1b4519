"""Shared fixtures: a tiny real Qwen3 target with a real byte-level BPE tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.targets.toy import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_EVAL = REPO.parent / "shared" / "datasets" / "eval"


def shared_eval_dir() -> Path:
    if not SHARED_EVAL.is_dir():
        raise FileNotFoundError(f"benchmark prompt files not found at {SHARED_EVAL}; the tests read them from there")
    return SHARED_EVAL


def build_tiny_target(
    directory: Path, *, vocab_size: int = 320, hidden: int = 32, layers: int = 3, seed: int = 0
) -> Path:
    """Save a randomly initialised Qwen3 and the toy target's BPE tokenizer trained on a few benchmark prompts."""
    texts = []
    with open(shared_eval_dir() / "gsm8k.jsonl", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index == 200:
                break
            texts.extend(json.loads(line)["turns"])
    fast = train_tokenizer(texts, vocab_size, model_max_length=1024)
    fast.save_pretrained(directory)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
        # A wide init makes the random model's greedy output vary instead of repeating one token.
        initializer_range=0.5,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("tiny-target"))

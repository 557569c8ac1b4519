"""A tiny Gemma4 target built offline: loading, hidden-state capture, layer ids, and a Gemma4 DSpark draft on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.gemma4 import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

from deepspec.config import ConfigError, PipelineConfig, validate_config
from deepspec.drafts.dspark import build_draft
from deepspec.drafts.dspark_drafter import DSparkDrafter, sample_block
from deepspec.drafts.dspark_gemma4 import Gemma4DSparkModel
from deepspec.drafts.gemma4_layers import soft_cap
from deepspec.drafts.losses import dspark_loss
from deepspec.targets import (
    MASK_TOKEN,
    decoder_layers,
    hidden_size,
    load_target,
    load_tokenizer,
    num_target_layers,
    validate_layer_ids,
)
from deepspec.targets.capture import capture_hidden_states
from deepspec.targets.toy import train_tokenizer
from tests.conftest import shared_eval_dir

HIDDEN = 32
NUM_LAYERS = 4
LAYER_IDS = [1, 2]
SOFTCAP = 5.0


def text_config(vocab_size: int, per_layer_input: int = 0) -> Gemma4TextConfig:
    return Gemma4TextConfig(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size_per_layer_input=per_layer_input,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        final_logit_softcapping=SOFTCAP,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_gemma4_target(directory: Path) -> Path:
    """Save a random Gemma4 multimodal-class target (text only) and a BPE tokenizer trained on benchmark prompts."""
    texts = []
    with open(shared_eval_dir() / "gsm8k.jsonl", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index == 100:
                break
            texts.extend(json.loads(line)["turns"])
    tokenizer = train_tokenizer(texts, 256, model_max_length=256)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = Gemma4Config(text_config=text_config(len(tokenizer)), vision_config=None, audio_config=None)
    Gemma4ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def pipeline_config(target_dir: Path) -> PipelineConfig:
    return validate_config(
        {"target": {"name_or_path": str(target_dir)}, "data": {"sources": [{"name": "gsm8k", "path": "gsm8k.jsonl"}]}}
    )


@pytest.fixture(scope="module")
def target_and_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    config = pipeline_config(build_gemma4_target(tmp_path_factory.mktemp("gemma4-target")))
    return load_target(config), load_tokenizer(config)


@pytest.fixture(scope="module")
def batch(target_and_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> dict[str, torch.Tensor]:
    _, tokenizer = target_and_tokenizer
    texts = ["Natalia sold clips to 48 of her friends in April.", "How many clips did she sell?"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    loss_mask = encoded["attention_mask"].clone()
    loss_mask[:, :3] = 0  # a short "user" prefix outside the loss
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "loss_mask": loss_mask}


def test_loads_multimodal_gemma4_frozen(target_and_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    target, _ = target_and_tokenizer
    assert isinstance(target, Gemma4ForConditionalGeneration)
    assert not target.training
    assert not any(parameter.requires_grad for parameter in target.parameters())
    assert num_target_layers(target.config) == NUM_LAYERS
    assert hidden_size(target.config) == HIDDEN
    assert decoder_layers(target) is target.model.language_model.layers


def test_capture_reads_the_text_backbone(
    target_and_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase], batch: dict[str, torch.Tensor]
) -> None:
    target, _ = target_and_tokenizer
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        features, last = capture_hidden_states(target, ids, mask, [-1, *LAYER_IDS])
        reference = target.model.language_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logits = target(input_ids=ids, attention_mask=mask).logits
    assert features.shape == (*ids.shape, 3 * HIDDEN)
    expected = torch.cat([reference.hidden_states[layer + 1] for layer in [-1, *LAYER_IDS]], dim=-1)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    torch.testing.assert_close(last, reference.last_hidden_state, rtol=0, atol=0)
    # The target's logits are the soft-capped LM head of the captured post-norm state.
    torch.testing.assert_close(soft_cap(target.lm_head(last), SOFTCAP), logits, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= SOFTCAP


def test_layer_ids_are_checked_against_the_text_config(
    target_and_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase], batch: dict[str, torch.Tensor]
) -> None:
    target, _ = target_and_tokenizer
    depth = num_target_layers(target.config)
    validate_layer_ids(LAYER_IDS, depth)
    with pytest.raises(ConfigError, match="the target's last layer"):
        validate_layer_ids([1, depth - 1], depth)
    with pytest.raises(ConfigError, match=f"outside \\[-1, {depth - 2}\\]"):
        validate_layer_ids([depth], depth)
    with pytest.raises(ValueError, match=f"layer id {depth} is out of range"):
        capture_hidden_states(target, batch["input_ids"], batch["attention_mask"], [depth])


def test_gemma4_draft_trains_and_drafts_against_the_target(
    target_and_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase], batch: dict[str, torch.Tensor]
) -> None:
    target, tokenizer = target_and_tokenizer
    draft = build_draft(
        target,
        layer_ids=LAYER_IDS,
        block_size=3,
        num_layers=1,
        num_anchors=4,
        markov_rank=4,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN),
        seed=0,
    )
    assert isinstance(draft, Gemma4DSparkModel)
    assert draft.config.target_model_type == "gemma4"
    assert draft.config.target_text_model_type == "gemma4_text"
    assert draft.layers[0].self_attn.v_proj is None  # attention_k_eq_v is copied from the target
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        features, last = capture_hidden_states(target, ids, mask, LAYER_IDS)
        target_logits = target(input_ids=ids, attention_mask=mask).logits
    output = draft(ids, features, batch["loss_mask"], last, generator=torch.Generator().manual_seed(0))
    assert output.eval_mask.any()
    # The aligned target logits are the target's own (soft-capped) next-token logits for each label.
    label_source = (output.anchor_positions[:, :, None] + torch.arange(3)).clamp(max=ids.shape[1] - 1)
    for b, n, j in output.eval_mask.nonzero().tolist():
        expected = target_logits[b, label_source[b, n, j]]
        torch.testing.assert_close(output.aligned_target_logits[b, n, j], expected, rtol=1e-5, atol=1e-5)
    result = dspark_loss(output, ce_alpha=0.1, l1_alpha=0.9, confidence_alpha=1.0, loss_decay_gamma=4.0)
    result.loss.backward()
    assert torch.isfinite(result.loss)
    for name, parameter in draft.named_parameters():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert draft.fc.weight.grad.abs().sum() > 0

    draft.eval()
    drafter = DSparkDrafter(draft)
    start = 6
    drafter.extend_context(features[0, :start])
    anchor = int(ids[0, start])
    proposal = drafter.propose(anchor, start, 0.0, None)
    assert proposal.tokens.shape == (3,)
    assert drafter.context_length == start, "proposing must not cache the block"
    # The cached context gives the same block as recomputing everything from scratch.
    with torch.no_grad():
        context = draft.context_features(features[:1, :start])
        context_kv = draft.context_kv(context, torch.arange(start)[None])
        block = torch.tensor([[anchor] + [draft.config.mask_token_id] * 2])
        hidden = draft.backbone(block, torch.arange(start, start + 3)[None], context_kv, mask=None)[0]
        replay = sample_block(draft, hidden, anchor, 0.0)
    torch.testing.assert_close(drafter.block_hidden(anchor, start), hidden)
    assert torch.equal(replay.tokens, proposal.tokens)
    assert proposal.confidence_logits is not None and proposal.confidence_logits.shape == (3,)


def test_gemma4_causal_lm_target_builds_a_draft() -> None:
    torch.manual_seed(0)
    target = Gemma4ForCausalLM(text_config(64)).eval()
    assert len(decoder_layers(target)) == NUM_LAYERS
    draft = build_draft(
        target,
        layer_ids=[-1, 1],
        block_size=2,
        num_layers=1,
        num_anchors=2,
        markov_rank=0,
        markov_head_type=None,
        enable_confidence_head=False,
        confidence_head_with_markov=None,
        mask_token_id=4,
        seed=0,
    )
    assert draft.config.target_model_type == "gemma4_text"
    assert draft.markov_head is None
    assert draft.confidence_head is None
    assert draft.fc.in_features == 2 * HIDDEN


def test_per_layer_input_target_rejected() -> None:
    torch.manual_seed(0)
    target = Gemma4ForCausalLM(text_config(64, per_layer_input=8)).eval()
    ids = torch.randint(5, 64, (1, 7))
    with torch.inference_mode():
        features, _ = capture_hidden_states(target, ids, torch.ones_like(ids), [0])
        reference = target(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(features, reference.hidden_states[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="hidden_size_per_layer_input must be 0"):
        build_draft(
            target,
            layer_ids=[0],
            block_size=2,
            num_layers=1,
            num_anchors=2,
            markov_rank=0,
            markov_head_type=None,
            enable_confidence_head=False,
            confidence_head_with_markov=None,
            mask_token_id=4,
            seed=0,
        )


def test_other_causal_lm_layers_are_hooked() -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    target = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.inference_mode():
        features, last = capture_hidden_states(target, ids, torch.ones_like(ids), [0, 1])
        reference = target(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(features, torch.cat(reference.hidden_states[1:3], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(last, reference.hidden_states[-1], rtol=0, atol=0)
    assert num_target_layers(config) == 3
    assert hidden_size(config) == 16


def test_capture_rejects_config_width_mismatch() -> None:
    torch.manual_seed(0)
    target = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    target.config.n_embd = 24  # a config that does not describe the loaded weights
    ids = torch.randint(0, 50, (1, 4))
    with pytest.raises(RuntimeError, match="GPT2LMHeadModel do not have the config's hidden size 24"):
        capture_hidden_states(target, ids, torch.ones_like(ids), [0])

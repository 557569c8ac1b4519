import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from deepspec.config.schema import DraftConfig
from deepspec.drafts.dspark import (
    DSparkConfig,
    Qwen3DSparkModel,
    anchor_candidates,
    attend,
    block_labels,
    build_block_attention_mask,
    build_draft,
    draft_kwargs_from_config,
    sample_anchor_positions,
)
from deepspec.drafts.dspark_drafter import DSparkDrafter, sample_block
from deepspec.drafts.heads import ConfidenceHead, GatedMarkovHead, RnnMarkovHead, VanillaMarkovHead, build_markov_head

VOCAB, HIDDEN, MASK = 64, 16, 63


def tiny_target(layers: int = 4, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    target = Qwen3ForCausalLM(config)
    with torch.no_grad():
        target.model.norm.weight.uniform_(0.5, 1.5)
    return target


def tiny_draft(
    target: Qwen3ForCausalLM | None = None, *, head: str = "vanilla", seed: int = 1, **overrides
) -> Qwen3DSparkModel:
    settings = dict(
        layer_ids=[0, 2],
        block_size=3,
        num_layers=2,
        num_anchors=4,
        markov_rank=4,
        markov_head_type=head,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        mask_token_id=MASK,
        seed=seed,
    )
    settings.update(overrides)
    return build_draft(target or tiny_target(), **settings)


def set_weight(module: torch.nn.Module, values: list) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.tensor(values, dtype=torch.float32))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Sequential heads on hand-computed inputs (vocab 3, rank 2, hidden 1).


def test_vanilla_head_is_low_rank_transition():
    head = VanillaMarkovHead(vocab_size=3, hidden_size=1, rank=2)
    set_weight(head.markov_w1, [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    set_weight(head.markov_w2, [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    bias = head.block_bias(torch.tensor([1, 2]), torch.zeros(2, 1))
    assert bias.tolist() == [[0.0, 2.0, -2.0], [1.0, 1.0, 0.0]]


def test_gated_head_gates_token_features():
    head = GatedMarkovHead(vocab_size=3, hidden_size=1, rank=2)
    set_weight(head.markov_w1, [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    set_weight(head.markov_w2, [[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    set_weight(head.gate_proj, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # gate = sigmoid([h, e_2])
    with torch.no_grad():
        head.gate_proj.bias.copy_(torch.tensor([0.0, -1.0]))
    bias = head.block_bias(torch.tensor([1]), torch.tensor([[0.5]]))
    gate = [sigmoid(0.5), sigmoid(2.0 - 1.0)]
    gated = [gate[0] * 0.0, gate[1] * 2.0]
    expected = [gated[0], gated[1], gated[0] - gated[1]]
    assert bias[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_rnn_head_uses_state_before_update():
    head = RnnMarkovHead(vocab_size=3, hidden_size=1, rank=1)
    set_weight(head.markov_w1, [[1.0], [2.0], [3.0]])
    set_weight(head.markov_w2, [[1.0], [-1.0], [2.0]])
    # joint input [s, e, h] -> (gate_raw, cand_raw, out_raw) = (0, e, s + h)
    set_weight(head.joint_proj, [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    with torch.no_grad():
        head.joint_proj.bias.zero_()
    prev = torch.tensor([1, 2])
    hidden = torch.tensor([[0.5], [0.25]])
    bias = head.block_bias(prev, hidden)

    out_0 = math.tanh(0.0 + 0.5)  # state starts at 0
    state_1 = 0.5 * 0.0 + 0.5 * math.tanh(2.0)
    out_1 = math.tanh(state_1 + 0.25)
    assert bias[0].tolist() == pytest.approx([out_0, -out_0, 2 * out_0], abs=1e-6)
    assert bias[1].tolist() == pytest.approx([out_1, -out_1, 2 * out_1], abs=1e-6)

    state = head.init_state((), hidden)
    stepped = []
    for slot in range(2):
        slot_bias, state = head.step_bias(prev[slot], hidden[slot], state)
        stepped.append(slot_bias)
    assert torch.allclose(torch.stack(stepped), bias)


def test_confidence_head_reads_hidden_and_token_features():
    head = ConfidenceHead(hidden_size=2, markov_rank=1, with_markov=True)
    set_weight(head.proj, [[1.0, -2.0, 0.5]])
    with torch.no_grad():
        head.proj.bias.fill_(0.25)
    logit = head(torch.tensor([[3.0, 1.0]]), torch.tensor([[4.0]]))
    assert logit.dtype == torch.float32
    assert logit.tolist() == pytest.approx([3.0 - 2.0 + 2.0 + 0.25])
    plain = ConfidenceHead(hidden_size=2, markov_rank=1, with_markov=False)
    assert plain.proj.in_features == 2


def test_markov_head_factory_rejects_bad_settings():
    with pytest.raises(ValueError, match="markov_head_type 'lstm'"):
        build_markov_head("lstm", vocab_size=4, hidden_size=2, rank=2)
    with pytest.raises(ValueError, match="markov_rank must be positive"):
        build_markov_head("vanilla", vocab_size=4, hidden_size=2, rank=0)


# Anchors, labels and the attention mask.


def test_anchor_needs_supervised_token_and_successor():
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1]])
    assert anchor_candidates(loss_mask).nonzero()[:, 1].tolist() == [1, 4, 5]


def test_anchor_sampling_keeps_all_when_few():
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    positions, keep = sample_anchor_positions(loss_mask, 5, torch.Generator().manual_seed(0))
    assert positions.tolist() == [[1, 4, 5, 0, 0], [5, 0, 0, 0, 0]]
    assert keep.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]


def test_anchor_sampling_draws_distinct_sorted_candidates():
    loss_mask = torch.ones(1, 40, dtype=torch.long)
    loss_mask[0, :5] = 0
    generator = torch.Generator().manual_seed(3)
    positions, keep = sample_anchor_positions(loss_mask, 8, generator)
    drawn = positions[0].tolist()
    assert keep.all()
    assert drawn == sorted(set(drawn))
    assert all(5 <= p <= 38 for p in drawn)
    again, _ = sample_anchor_positions(loss_mask, 8, torch.Generator().manual_seed(3))
    assert torch.equal(positions, again)


def test_anchor_sampling_is_uniform():
    loss_mask = torch.tensor([[1, 1, 1, 1, 1]])  # candidates 0..3
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    draws = 4000
    for _ in range(draws):
        positions, _ = sample_anchor_positions(loss_mask, 1, generator)
        counts[positions[0, 0]] += 1
    assert torch.all((counts / draws - 0.25).abs() < 0.03), counts


def test_anchor_sampling_short_sequence_is_all_dummy():
    positions, keep = sample_anchor_positions(torch.ones(2, 1, dtype=torch.long), 3)
    assert positions.shape == (2, 3)
    assert not keep.any()
    assert not positions.any()


def test_attention_mask_context_before_anchor_and_own_block():
    mask = build_block_attention_mask(torch.tensor([[2, 5]]), torch.tensor([[True, True]]), seq_len=6, block_size=2)
    assert mask.shape == (1, 1, 4, 10)
    rows = mask[0, 0].int().tolist()
    #            context 0..5      | block 0 | block 1
    assert rows[0] == [1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert rows[1] == [1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert rows[2] == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1]
    assert rows[3] == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1]


def test_attention_mask_dummy_block_sees_nothing():
    mask = build_block_attention_mask(torch.tensor([[3, 0]]), torch.tensor([[True, False]]), seq_len=5, block_size=2)
    assert mask[0, 0, 2:].sum() == 0
    assert mask[0, 0, :2].sum() == 2 * (3 + 2)


def test_fully_masked_row_gives_zero_not_nan():
    query = torch.randn(1, 2, 3, 4, requires_grad=True)
    key = torch.randn(1, 1, 5, 4, requires_grad=True)
    value = torch.randn(1, 1, 5, 4, requires_grad=True)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 1] = False
    output = attend(query, key, value, mask, dropout=0.0)
    assert torch.all(output[:, :, 1] == 0)
    assert torch.isfinite(output).all()
    output.sum().backward()
    assert torch.all(query.grad[:, :, 1] == 0)
    assert all(torch.isfinite(t.grad).all() for t in (query, key, value))


def test_label_mask_is_shifted_loss_mask():
    # ids [u0, u1, u2, a0, a1, a2, eot]: a prediction is supervised iff its label's loss_mask is set.
    input_ids = torch.tensor([[10, 11, 12, 20, 21, 22, 30]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    shifted = [0, 0, 1, 1, 1, 1, 0]
    anchors = torch.arange(7)[None]
    keep = torch.ones(1, 7, dtype=torch.bool)
    _, target_ids, eval_mask = block_labels(input_ids, loss_mask, anchors, keep, block_size=1)
    assert eval_mask[0, :, 0].int().tolist() == shifted
    assert target_ids[0, :6, 0].tolist() == [11, 12, 20, 21, 22, 30]
    assert anchor_candidates(loss_mask)[0].int().tolist() == [0, 0, 0, 1, 1, 1]


def test_block_labels_keep_supervised_prefix():
    input_ids = torch.tensor([[10, 11, 12, 20, 21, 22, 30]])
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1]])
    anchors = torch.tensor([[1, 4, 0]])
    keep = torch.tensor([[True, True, False]])
    label_index, target_ids, eval_mask = block_labels(input_ids, loss_mask, anchors, keep, block_size=3)
    # Anchor 1: labels 2, 3, 4 -> loss mask 1, 0, 1 -> prefix [1, 0, 0].
    assert eval_mask[0, 0].tolist() == [True, False, False]
    # Anchor 4: labels 5, 6, 7 (7 does not exist) -> [1, 1, 0].
    assert eval_mask[0, 1].tolist() == [True, True, False]
    assert label_index[0, 1].tolist() == [5, 6, 6]
    assert target_ids[0, 1].tolist() == [22, 30, 30]
    assert label_index[0, 2].tolist() == [0, 0, 0]
    assert not eval_mask[0, 2].any()


# Training forward.


def random_batch(seq_len: int = 12, features: int = 2 * HIDDEN, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(2, seq_len, dtype=torch.uint8)
    loss_mask[0, 3:] = 1
    loss_mask[1, 5:9] = 1
    return {
        "input_ids": torch.randint(0, VOCAB - 1, (2, seq_len), generator=generator),
        "target_hidden_states": torch.randn(2, seq_len, features, generator=generator),
        "loss_mask": loss_mask,
        "target_last_hidden_states": torch.randn(2, seq_len, HIDDEN, generator=generator),
    }


def test_forward_shapes_and_dummy_blocks_are_finite():
    draft = tiny_draft()
    batch = random_batch()
    output = draft.forward_train(**batch, generator=torch.Generator().manual_seed(0))
    assert output.draft_logits.shape == (2, 4, 3, VOCAB)
    assert output.confidence_pred.shape == (2, 4, 3)
    assert output.aligned_target_logits.shape == (2, 4, 3, VOCAB)
    assert output.block_keep_mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert output.num_valid_anchors.tolist() == [8, 3]
    assert torch.isfinite(output.draft_logits).all()
    (output.draft_logits.sum() + output.confidence_pred.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters() if p.requires_grad)


def test_block_sees_only_context_before_anchor():
    draft = tiny_draft()
    batch = random_batch()
    anchors = torch.tensor([[4, 7, 8, 9], [5, 6, 7, 0]])
    keep = torch.tensor([[True] * 4, [True, True, True, False]])
    base = draft.forward_train(**batch, anchor_positions=anchors, block_keep_mask=keep).draft_logits

    changed = dict(batch)
    changed["target_hidden_states"] = batch["target_hidden_states"].clone()
    changed["target_hidden_states"][0, 7] += 5.0  # visible to anchors 8 and 9 only
    logits = draft.forward_train(**changed, anchor_positions=anchors, block_keep_mask=keep).draft_logits
    assert torch.equal(logits[0, :2], base[0, :2])
    assert not torch.allclose(logits[0, 2:], base[0, 2:])
    assert torch.equal(logits[1], base[1])


def test_blocks_do_not_see_each_other():
    draft = tiny_draft()
    batch = random_batch()
    anchors = torch.tensor([[4, 7, 8, 9], [5, 6, 7, 0]])
    keep = torch.tensor([[True] * 4, [True, True, True, False]])
    base = draft.forward_train(**batch, anchor_positions=anchors, block_keep_mask=keep)
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][0, 7] = (batch["input_ids"][0, 7] + 1) % (VOCAB - 1)  # anchor token of block 1
    output = draft.forward_train(**changed, anchor_positions=anchors, block_keep_mask=keep)
    # Token 7 is block 1's anchor; block 0 reads it only as a label, blocks 2 and 3 not at all.
    assert not torch.allclose(output.draft_logits[0, 1], base.draft_logits[0, 1])
    for block in (0, 2, 3):
        assert torch.equal(output.draft_logits[0, block], base.draft_logits[0, block]), block


def test_forward_rejects_bad_shapes():
    draft = tiny_draft()
    batch = random_batch(features=3 * HIDDEN)
    with pytest.raises(ValueError, match="expected 32 = 2 target layers x hidden 16"):
        draft.forward_train(**batch)
    batch = random_batch()
    with pytest.raises(ValueError, match="block_keep_mask"):
        draft.forward_train(**batch, anchor_positions=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must both be \[batch=2, num_blocks\]"):
        draft.forward_train(
            **batch,
            anchor_positions=torch.zeros(2, 4, dtype=torch.long),
            block_keep_mask=torch.ones(2, 3, dtype=torch.bool),
        )


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_drafting_matches_training_forward(head):
    draft = tiny_draft(head=head).eval()
    batch = random_batch()
    anchors = torch.tensor([[4, 7, 8, 9], [5, 6, 7, 0]])
    keep = torch.tensor([[True] * 4, [True, True, True, False]])
    with torch.no_grad():
        output = draft.forward_train(**batch, anchor_positions=anchors, block_keep_mask=keep)
    drafter = DSparkDrafter(draft)
    anchor = 7
    drafter.extend_context(batch["target_hidden_states"][0, :4])
    drafter.extend_context(batch["target_hidden_states"][0, 4:anchor])
    with torch.no_grad():
        hidden = drafter.block_hidden(int(batch["input_ids"][0, anchor]), anchor)
        block = sample_block(
            draft, hidden, int(batch["input_ids"][0, anchor]), 1.0, forced_tokens=output.target_ids[0, 1]
        )
    assert torch.allclose(block.corrected_logits, output.draft_logits[0, 1], atol=1e-5)
    assert torch.allclose(block.confidence_logits, output.confidence_pred[0, 1], atol=1e-5)


def test_drafter_requires_context_up_to_anchor():
    drafter = DSparkDrafter(tiny_draft().eval())
    drafter.extend_context(torch.randn(3, 2 * HIDDEN))
    with pytest.raises(ValueError, match="3 are cached"):
        drafter.propose(5, 4, 0.0, None)
    with pytest.raises(ValueError, match=r"\[n, 32\]"):
        drafter.extend_context(torch.randn(3, HIDDEN))
    proposal = drafter.propose(5, 3, 0.0, None)
    assert proposal.tokens.shape == (3,)
    assert proposal.probs.shape == (3, VOCAB)
    assert proposal.confidence_logits.shape == (3,)
    drafter.reset()
    assert drafter.context_length == 0
    assert drafter.propose(5, 0, 0.0, None).tokens.shape == (3,)


# Building a draft for a target.


def test_build_draft_copies_and_freezes_target_parts():
    target = tiny_target()
    draft = tiny_draft(target)
    assert torch.equal(draft.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    assert torch.equal(draft.norm.weight, target.model.norm.weight)
    assert draft.embed_tokens.weight.data_ptr() != draft.lm_head.weight.data_ptr()
    assert not draft.embed_tokens.weight.requires_grad
    assert not draft.lm_head.weight.requires_grad
    assert draft.fc.weight.requires_grad
    assert draft.config.tie_word_embeddings is False
    assert draft.config.architectures == ["Qwen3DSparkModel"]
    assert draft.config.num_target_layers == 4
    assert draft.config.layer_types == ["full_attention", "full_attention"]
    assert torch.all(draft.layers[0].input_layernorm.weight == 1.0)


def test_build_draft_seed_is_reproducible_and_isolated():
    target = tiny_target()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_draft(target, seed=5)
    after = torch.rand(1)
    second = tiny_draft(target, seed=5)
    other = tiny_draft(target, seed=6)
    assert torch.equal(before, after), "build_draft must not consume the global RNG"
    assert torch.equal(first.fc.weight, second.fc.weight)
    assert not torch.equal(first.fc.weight, other.fc.weight)
    assert first.fc.weight.std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize(
    "layer_ids, message",
    [([], "empty"), ([2, 1], "strictly increasing"), ([0, 3], r"\[3\] are invalid"), ([-2], r"\[-2\] are invalid")],
)
def test_build_draft_rejects_bad_layer_ids(layer_ids, message):
    with pytest.raises(ValueError, match=message):
        tiny_draft(layer_ids=layer_ids)


def test_build_draft_accepts_embedding_layer_id():
    assert tiny_draft(layer_ids=[-1, 2]).fc.in_features == 2 * HIDDEN


def test_build_draft_rejects_non_qwen3_target():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    with pytest.raises(ValueError, match="model_type 'llama'"):
        tiny_draft(LlamaForCausalLM(config))


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="markov_head_type"):
        tiny_draft(markov_head_type=None)
    with pytest.raises(ValueError, match="confidence_head_with_markov needs a Markov head"):
        tiny_draft(markov_rank=0)
    with pytest.raises(ValueError, match="mask_token_id"):
        tiny_draft(mask_token_id=VOCAB)


def test_dflash_draft_has_no_heads():
    draft = tiny_draft(markov_rank=0, markov_head_type=None, enable_confidence_head=False)
    assert draft.markov_head is None
    assert draft.confidence_head is None
    assert draft.config.markov_head_type is None
    assert draft.config.confidence_head_with_markov is None


def test_draft_kwargs_from_config_for_both_algorithms():
    dspark = draft_kwargs_from_config(DraftConfig(mask_token_id=7), layer_ids=[0, 2], seed=4)
    assert dspark["markov_rank"] == 32
    assert dspark["markov_head_type"] == "vanilla"
    assert dspark["enable_confidence_head"] is True
    assert dspark["confidence_head_with_markov"] is True
    assert dspark["mask_token_id"] == 7
    assert dspark["seed"] == 4
    assert dspark["layer_ids"] == [0, 2]
    dflash = draft_kwargs_from_config(DraftConfig(algorithm="dflash"), layer_ids=[1], mask_token_id=9)
    assert dflash["markov_rank"] == 0
    assert dflash["markov_head_type"] is None
    assert dflash["enable_confidence_head"] is False
    assert dflash["confidence_head_with_markov"] is None
    assert dflash["mask_token_id"] == 9
    draft = build_draft(tiny_target(), **dflash)
    assert draft.markov_head is None
    assert draft.confidence_head is None


def test_draft_kwargs_from_config_rejects_conflicts():
    with pytest.raises(ValueError, match="dflash has neither head"):
        draft_kwargs_from_config(DraftConfig(algorithm="dflash", markov_rank=8), layer_ids=[0], mask_token_id=1)
    with pytest.raises(ValueError, match="draft.mask_token_id"):
        draft_kwargs_from_config(DraftConfig(), layer_ids=[0])


def test_config_subclass_loads_plain_qwen3_fields():
    config = DSparkConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_target_layers=4, target_layer_ids=[0], mask_token_id=1
    )
    assert config.model_type == "qwen3"
    assert config.block_size == 7
    assert config.num_anchors == 512
    assert config.markov_rank == 0

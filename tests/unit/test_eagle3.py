"""Eagle3 draft: TTT masks and shifts, the step-decayed loss, building from a target, and drafting."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from deepspec.drafts.eagle3 import (
    Eagle3ForwardOutput,
    Qwen3Eagle3Model,
    base_position_mask,
    build_eagle3_draft,
    shift_left,
    ttt_attention_mask,
)
from deepspec.drafts.eagle3_drafter import Eagle3Drafter, causal_extension_mask
from deepspec.drafts.eagle3_loss import eagle3_loss, step_weights
from deepspec.eval.speculative import speculative_generate
from deepspec.runtime import configure_runtime

VOCAB, HIDDEN, LAYER_IDS, TTT = 64, 32, [0, 1], 3


@pytest.fixture(autouse=True, scope="module")
def fast_runtime() -> None:
    # Trained tiny models produce denormal floats, which are 10-20x slower on CPU unless flushed.
    configure_runtime()


def tiny_target(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_draft(seed: int = 0) -> Qwen3Eagle3Model:
    draft = build_eagle3_draft(tiny_target(), layer_ids=LAYER_IDS, ttt_length=TTT, seed=seed)
    # Spread the weights so that drafted distributions are far from uniform.
    with torch.no_grad():
        for parameter in draft.parameters():
            if parameter.requires_grad and parameter.dim() == 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[1]))
    return draft.eval()


def features(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(length, len(LAYER_IDS) * HIDDEN, generator=torch.Generator().manual_seed(seed))


def ttt_logits(model: Qwen3Eagle3Model, ids: list[int], feats: torch.Tensor) -> list[torch.Tensor]:
    """Run the training unroll over one full-length sequence; return each step's logits ``[T, V]``."""
    length = len(ids)
    with torch.no_grad():
        output = model.forward_train(
            input_ids=torch.tensor([ids]),
            target_hidden_states=feats[None, :length],
            loss_mask=torch.ones(1, length, dtype=torch.uint8),
            attention_mask=torch.ones(1, length, dtype=torch.int64),
            target_last_hidden_states=torch.randn(1, length, HIDDEN),
        )
    return [logits[0] for logits in output.draft_logits]


def test_mask_step0_is_causal_within_length():
    mask = ttt_attention_mask(torch.tensor([3]), seq_len=4, step=0)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_mask_later_steps_see_own_slot():
    mask = ttt_attention_mask(torch.tensor([4]), seq_len=4, step=2)[0, 0]
    assert mask.shape == (4, 12)
    # Valid queries: q < 4 - 2.
    assert not mask[2:].any()
    assert torch.equal(mask[0], torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool))
    assert torch.equal(mask[1], torch.tensor([1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], dtype=torch.bool))


def test_mask_per_sample_lengths():
    mask = ttt_attention_mask(torch.tensor([4, 2]), seq_len=4, step=1)
    assert mask.shape == (2, 1, 4, 8)
    assert mask[0, 0, :3].any(dim=-1).all()
    assert not mask[0, 0, 3].any()
    assert mask[1, 0, 0].any()
    assert not mask[1, 0, 1:].any()


def test_shift_left_fills_zeros():
    ids = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(ids, 1).tolist() == [[2, 3, 4, 0]]
    assert shift_left(ids, 3).tolist() == [[4, 0, 0, 0]]
    assert shift_left(ids, 5).tolist() == [[0, 0, 0, 0]]


def test_base_mask_drops_last_real_token():
    loss_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.uint8)
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    base = base_position_mask(loss_mask, attention)
    assert base.tolist() == [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_step_weights_decay():
    assert step_weights(3, 0.8) == pytest.approx([1.0, 0.8, 0.64])
    assert step_weights(1, 0.5) == [1.0]


def test_loss_of_uniform_draft_is_log_vocab():
    batch, length, vocab = 2, 3, 8
    masks = [torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])]
    target = torch.softmax(torch.randn(batch, length, vocab), dim=-1)
    output = Eagle3ForwardOutput(
        draft_logits=[torch.zeros(batch, length, vocab, requires_grad=True) for _ in masks],
        target_probs=[target, target],
        position_masks=masks,
        seq_len=length,
    )
    loss = eagle3_loss(output, step_loss_decay=0.5)
    # Every supervised position costs log(V); padding counts in the B*T denominator.
    expected_steps = [3 * math.log(vocab) / 6, 1 * math.log(vocab) / 6]
    assert float(loss.components["ploss_0"]) == pytest.approx(expected_steps[0], rel=1e-6)
    assert float(loss.components["ploss_1"]) == pytest.approx(expected_steps[1], rel=1e-6)
    assert float(loss.loss.detach()) == pytest.approx(expected_steps[0] + 0.5 * expected_steps[1], rel=1e-6)
    assert loss.num_supervised == 3
    assert float(loss.metrics["valid_tokens@1"]) == 1.0


def test_tau_metric_counts_correct_prefix():
    vocab = 4
    target = torch.zeros(1, 2, vocab)
    target[..., 1] = 1.0
    right = torch.full((1, 2, vocab), -5.0)
    right[..., 1] = 5.0
    wrong = torch.full((1, 2, vocab), -5.0)
    wrong[..., 2] = 5.0
    mask = torch.ones(1, 2)
    output = Eagle3ForwardOutput(
        draft_logits=[right, wrong, right],
        target_probs=[target] * 3,
        position_masks=[mask] * 3,
        seq_len=2,
    )
    metrics = eagle3_loss(output, step_loss_decay=0.8).metrics
    # Step 1 is wrong everywhere, so the chain stops after step 0: tau = 1 + 1.
    assert float(metrics["tau_greedy"]) == pytest.approx(2.0)
    assert float(metrics["accuracy@0"]) == 1.0
    assert float(metrics["accuracy@1"]) == 0.0


def test_build_copies_frozen_target_weights():
    target = tiny_target()
    draft = build_eagle3_draft(target, layer_ids=LAYER_IDS, ttt_length=TTT, seed=3)
    assert torch.equal(draft.embed_tokens.weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.lm_head.weight, target.get_output_embeddings().weight)
    frozen = sorted(name for name, parameter in draft.named_parameters() if not parameter.requires_grad)
    assert frozen == ["embed_tokens.weight", "lm_head.weight"]
    assert draft.fc.weight.shape == (HIDDEN, len(LAYER_IDS) * HIDDEN)
    assert draft.layers[0].self_attn.q_proj.weight.shape == (32, 2 * HIDDEN)
    assert draft.config.architectures == ["Qwen3Eagle3Model"]
    assert draft.config.ttt_length == TTT


def test_build_rejects_last_target_layer():
    with pytest.raises(ValueError, match="target_layer_ids"):
        build_eagle3_draft(tiny_target(), layer_ids=[0, 2])


def test_padded_rows_get_no_nan_gradient():
    draft = tiny_draft()
    draft.train()
    ids = torch.randint(0, VOCAB, (2, 6))
    attention = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    output = draft.forward_train(
        input_ids=ids,
        target_hidden_states=torch.randn(2, 6, len(LAYER_IDS) * HIDDEN),
        loss_mask=attention.to(torch.uint8),
        attention_mask=attention,
        target_last_hidden_states=torch.randn(2, 6, HIDDEN),
    )
    loss = eagle3_loss(output, step_loss_decay=0.8)
    loss.loss.backward()
    for name, parameter in draft.named_parameters():
        if parameter.requires_grad:
            assert torch.isfinite(parameter.grad).all(), name


def test_training_lowers_loss():
    draft = tiny_draft()
    draft.train()
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, VOCAB, (2, 10), generator=generator),
        "target_hidden_states": torch.randn(2, 10, len(LAYER_IDS) * HIDDEN, generator=generator),
        "loss_mask": torch.ones(2, 10, dtype=torch.uint8),
        "attention_mask": torch.ones(2, 10, dtype=torch.int64),
        # Large target states make the target distributions peaked, so the loss can fall well below log(V).
        "target_last_hidden_states": 200.0 * torch.randn(2, 10, HIDDEN, generator=generator),
    }
    optimizer = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = eagle3_loss(draft.forward_train(**batch), step_loss_decay=0.8).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.9


def test_causal_extension_mask():
    assert causal_extension_mask(3, 1, torch.device("cpu")) is None
    mask = causal_extension_mask(2, 2, torch.device("cpu"))[0, 0]
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_drafter_proposes_ttt_length_tokens_from_their_probs():
    draft = tiny_draft()
    prompt = list(range(5, 11))
    drafter = Eagle3Drafter(draft, prompt_ids=prompt)
    drafter.extend_context(features(len(prompt)))
    proposal = drafter.propose(20, len(prompt), 1.0, torch.Generator().manual_seed(0))
    assert proposal.tokens.shape == (TTT,)
    assert proposal.probs.shape == (TTT, VOCAB)
    assert torch.allclose(proposal.probs.sum(dim=-1), torch.ones(TTT))
    assert (proposal.probs.gather(1, proposal.tokens[:, None]) > 0).all()


def test_drafter_probs_match_training_unroll():
    draft = tiny_draft()
    feats = features(32)
    prompt = [3, 9, 14, 1, 7, 22]
    n = len(prompt)
    drafter = Eagle3Drafter(draft, prompt_ids=prompt)
    generator = torch.Generator().manual_seed(5)

    drafter.extend_context(feats[:n])
    first = drafter.propose(11, n, 1.0, generator)
    # One draft accepted, then a correction token; the anchor of round two sits at n + 2.
    drafter.extend_context(feats[n : n + 2])
    second = drafter.propose(40, n + 2, 1.0, generator)

    ids = [*prompt, 11, int(first.tokens[0]), 40, *second.tokens.tolist()]
    logits = ttt_logits(draft, ids, feats)
    # At step k, position t contains token x_{t+k+1}: the anchor's pair sits at t = anchor - 1.
    for step in range(TTT):
        expected = torch.softmax(logits[step][n + 1], dim=-1)
        torch.testing.assert_close(second.probs[step], expected, atol=1e-5, rtol=1e-4)
    for step in range(2):  # round one's later drafts differ from the committed tokens
        expected = torch.softmax(logits[step][n - 1], dim=-1)
        torch.testing.assert_close(first.probs[step], expected, atol=1e-5, rtol=1e-4)


def test_greedy_drafts_are_argmax_path():
    draft = tiny_draft()
    feats = features(16)
    prompt = [2, 8, 30, 4]
    drafter = Eagle3Drafter(draft, prompt_ids=prompt)
    drafter.extend_context(feats[: len(prompt)])
    proposal = drafter.propose(17, len(prompt), 0.0, None)
    assert torch.equal(proposal.probs.argmax(dim=-1), proposal.tokens)
    assert torch.equal(proposal.probs.sum(dim=-1), torch.ones(TTT))
    logits = ttt_logits(draft, [*prompt, 17, *proposal.tokens.tolist()], feats)
    for step in range(TTT):
        assert int(logits[step][len(prompt) - 1].argmax()) == int(proposal.tokens[step])


def test_drafter_stops_after_end_token():
    draft = tiny_draft()
    prompt = [2, 8, 30, 4]
    greedy = Eagle3Drafter(draft, prompt_ids=prompt)
    greedy.extend_context(features(4))
    first_token = int(greedy.propose(17, 4, 0.0, None).tokens[0])

    drafter = Eagle3Drafter(draft, prompt_ids=prompt, end_token_ids=[first_token])
    drafter.extend_context(features(4))
    proposal = drafter.propose(17, 4, 0.0, None)
    assert proposal.tokens.tolist() == [first_token]


def test_drafter_needs_prompt_tokens():
    drafter = Eagle3Drafter(tiny_draft())
    drafter.extend_context(features(4))
    with pytest.raises(ValueError, match="call reset with the prompt"):
        drafter.propose(17, 4, 0.0, None)


def test_drafter_rejects_wrong_feature_width():
    drafter = Eagle3Drafter(tiny_draft(), prompt_ids=[1, 2])
    with pytest.raises(ValueError, match="features must have shape"):
        drafter.extend_context(torch.randn(2, HIDDEN))


def test_drafter_reset_keeps_prompt():
    draft = tiny_draft()
    drafter = Eagle3Drafter(draft, prompt_ids=[2, 8, 30, 4])
    drafter.extend_context(features(4))
    before = drafter.propose(17, 4, 0.0, None)
    drafter.reset()
    assert drafter.context_length == 0
    drafter.extend_context(features(4))
    after = drafter.propose(17, 4, 0.0, None)
    assert torch.equal(before.tokens, after.tokens)


def greedy_reference(target: Qwen3ForCausalLM, prompt: list[int], count: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(target(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_speculative_greedy_equals_target_greedy():
    target = tiny_target()
    draft = build_eagle3_draft(target, layer_ids=LAYER_IDS, ttt_length=TTT, seed=1).eval()
    prompt = [5, 17, 33, 2, 40, 9]
    drafter = Eagle3Drafter(draft, prompt_ids=prompt)
    result = speculative_generate(
        target,
        drafter,
        prompt,
        layer_ids=LAYER_IDS,
        max_new_tokens=12,
        temperature=0.0,
        end_token_ids=[],
        generator=None,
    )
    assert result.tokens == greedy_reference(target, prompt, 12)
    assert all(record.proposal_length == TTT for record in result.rounds)


def test_speculative_sampling_runs_rounds():
    target = tiny_target()
    draft = build_eagle3_draft(target, layer_ids=LAYER_IDS, ttt_length=TTT, seed=1).eval()
    prompt = [5, 17, 33, 2, 40, 9]
    drafter = Eagle3Drafter(draft, prompt_ids=prompt)
    result = speculative_generate(
        target,
        drafter,
        prompt,
        layer_ids=LAYER_IDS,
        max_new_tokens=24,
        temperature=1.0,
        end_token_ids=[],
        generator=torch.Generator().manual_seed(0),
    )
    assert len(result.tokens) == 24
    # Both models are close to uniform, so drafts are often accepted. The drafter then rebuilds the
    # committed tokens from its own proposals and raises if they disagree with the anchor positions.
    assert max(record.accepted for record in result.rounds) >= 2
    assert all(record.proposal_length == TTT for record in result.rounds)

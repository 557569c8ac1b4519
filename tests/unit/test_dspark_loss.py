import math

import pytest
import torch

from deepspec.config.schema import DraftConfig
from deepspec.drafts.dspark import DSparkForwardOutput
from deepspec.drafts.losses import dspark_loss, loss_kwargs_from_config, position_weights

# One sample, one kept block of 2 slots, vocabulary 2: every term is easy to write out.
DRAFT_LOGITS = [[0.0, 1.0], [2.0, 0.0]]
TARGET_LOGITS = [[1.0, 0.0], [2.0, 0.0]]
TARGET_IDS = [1, 0]
CONFIDENCE = [0.5, -1.0]
GAMMA = 2.0


def make_output(eval_mask: list[bool], *, confidence: bool = True, target: bool = True) -> DSparkForwardOutput:
    return DSparkForwardOutput(
        draft_logits=torch.tensor([[DRAFT_LOGITS]], requires_grad=True),
        target_ids=torch.tensor([[TARGET_IDS]]),
        eval_mask=torch.tensor([[eval_mask]]),
        block_keep_mask=torch.tensor([[True]]),
        anchor_positions=torch.tensor([[0]]),
        confidence_pred=torch.tensor([[CONFIDENCE]], requires_grad=True) if confidence else None,
        aligned_target_logits=torch.tensor([[TARGET_LOGITS]]) if target else None,
        num_valid_anchors=torch.tensor([1]),
        seq_len=4,
    )


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [x / sum(exps) for x in exps]


def cross_entropy(row: list[float], label: int) -> float:
    return -math.log(softmax(row)[label])


def l1(slot: int) -> float:
    return sum(abs(p - q) for p, q in zip(softmax(DRAFT_LOGITS[slot]), softmax(TARGET_LOGITS[slot]), strict=False))


def bce(logit: float, target: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def test_position_weights_follow_code_convention():
    assert position_weights(3, 4.0, torch.device("cpu")).tolist() == pytest.approx(
        [1.0, math.exp(-0.25), math.exp(-0.5)]
    )
    assert position_weights(3, None, torch.device("cpu")).tolist() == [1.0, 1.0, 1.0]
    assert position_weights(3, 0.0, torch.device("cpu")).tolist() == [1.0, 1.0, 1.0]


def test_loss_terms_match_hand_computation():
    weights = [1.0, math.exp(-1.0 / GAMMA)]
    denominator = sum(weights)
    accept = [1.0 - 0.5 * l1(k) for k in range(2)]
    ce = sum(w * cross_entropy(DRAFT_LOGITS[k], TARGET_IDS[k]) for k, w in enumerate(weights)) / denominator
    l1_loss = sum(w * l1(k) for k, w in enumerate(weights)) / denominator
    confidence = sum(w * bce(CONFIDENCE[k], accept[k]) for k, w in enumerate(weights)) / denominator

    result = dspark_loss(
        make_output([True, True]), ce_alpha=0.1, l1_alpha=0.9, confidence_alpha=1.0, loss_decay_gamma=GAMMA
    )
    assert result.components["ce_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert result.components["l1_loss"].item() == pytest.approx(l1_loss, rel=1e-5)
    assert result.components["confidence_loss"].item() == pytest.approx(confidence, rel=1e-5)
    assert result.components["ce_loss_den"].item() == pytest.approx(denominator, rel=1e-6)
    assert result.loss.item() == pytest.approx(0.1 * ce + 0.9 * l1_loss + confidence, rel=1e-5)
    assert result.num_supervised == 2


def test_metrics_match_hand_computation():
    accept = [1.0 - 0.5 * l1(k) for k in range(2)]
    result = dspark_loss(
        make_output([True, True]), ce_alpha=1.0, l1_alpha=0.0, confidence_alpha=1.0, loss_decay_gamma=GAMMA
    )
    metrics = {name: value.item() for name, value in result.metrics.items()}
    assert metrics["accept_rate@0"] == pytest.approx(accept[0], rel=1e-5)
    assert metrics["accept_rate@1"] == pytest.approx(accept[1], rel=1e-5)
    assert metrics["tau_probabilistic"] == pytest.approx(1 + accept[0] + accept[0] * accept[1], rel=1e-5)
    assert metrics["accuracy@0"] == 1.0  # argmax of [0, 1] is the label 1
    assert metrics["accuracy@1"] == 1.0
    assert metrics["accuracy"] == 1.0
    assert metrics["block_supervised_tokens_abs"] == 2.0
    assert metrics["sampled_anchors_ratio"] == 1.0
    assert metrics["valid_anchors_ratio"] == 0.25
    weights = [1.0, math.exp(-1.0 / GAMMA)]
    predicted = [1.0 / (1.0 + math.exp(-c)) for c in CONFIDENCE]
    bias = sum(w * (p - a) for w, p, a in zip(weights, predicted, accept, strict=False)) / sum(weights)
    assert metrics["confidence_bias"] == pytest.approx(bias, rel=1e-5)


def test_unsupervised_slot_gets_no_weight():
    full = dspark_loss(
        make_output([True, False]), ce_alpha=1.0, l1_alpha=0.0, confidence_alpha=0.0, loss_decay_gamma=GAMMA
    )
    assert full.components["ce_loss"].item() == pytest.approx(cross_entropy(DRAFT_LOGITS[0], TARGET_IDS[0]), rel=1e-5)
    assert full.num_supervised == 1


def test_l1_term_only_with_positive_alpha():
    result = dspark_loss(
        make_output([True, True]), ce_alpha=1.0, l1_alpha=0.0, confidence_alpha=0.0, loss_decay_gamma=GAMMA
    )
    assert result.components["l1_loss_num"].item() == 0.0
    assert result.components["l1_loss_den"].item() == 0.0
    assert "l1_loss" not in result.metrics
    assert "accept_rate@0" in result.metrics


def test_ce_only_without_target_logits():
    output = make_output([True, True], confidence=False, target=False)
    result = dspark_loss(output, ce_alpha=1.0, l1_alpha=0.0, confidence_alpha=0.0, loss_decay_gamma=None)
    expected = (cross_entropy(DRAFT_LOGITS[0], 1) + cross_entropy(DRAFT_LOGITS[1], 0)) / 2
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="aligned target logits"):
        dspark_loss(output, ce_alpha=1.0, l1_alpha=0.5, confidence_alpha=0.0, loss_decay_gamma=None)


def test_zero_supervised_gives_zero_finite_loss():
    output = make_output([False, False])
    result = dspark_loss(output, ce_alpha=0.1, l1_alpha=0.9, confidence_alpha=1.0, loss_decay_gamma=4.0)
    assert result.num_supervised == 0
    assert result.loss.item() == 0.0
    result.loss.backward()
    assert torch.all(output.draft_logits.grad == 0)
    assert torch.all(output.confidence_pred.grad == 0)
    assert all(math.isfinite(value.item()) for value in result.metrics.values())


def test_denominators_are_summed_over_ranks():
    single = dspark_loss(
        make_output([True, True]), ce_alpha=0.1, l1_alpha=0.9, confidence_alpha=1.0, loss_decay_gamma=4.0
    )
    seen: list[torch.Tensor] = []

    def two_identical_ranks(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor.clone())
        return tensor * 2

    output = make_output([True, True])
    double = dspark_loss(
        output,
        ce_alpha=0.1,
        l1_alpha=0.9,
        confidence_alpha=1.0,
        loss_decay_gamma=4.0,
        all_reduce=two_identical_ranks,
        world_size=2,
    )
    assert len(seen) == 1, "one all-reduce per micro-batch"
    # Gradient averaging over 2 ranks then gives the global weighted mean, equal to the single-rank loss.
    assert double.loss.item() == pytest.approx(single.loss.item(), rel=1e-6)
    assert double.num_supervised == 4
    assert double.components["ce_loss_den_global"].item() == pytest.approx(2 * single.components["ce_loss_den"].item())
    assert double.metrics["loss"].item() == pytest.approx(single.metrics["loss"].item())


def test_loss_gradient_flows_to_draft_side_only():
    output = make_output([True, True])
    output.aligned_target_logits.requires_grad_(True)
    dspark_loss(output, ce_alpha=0.0, l1_alpha=1.0, confidence_alpha=0.0, loss_decay_gamma=None).loss.backward()
    assert output.draft_logits.grad.abs().sum() > 0
    assert output.aligned_target_logits.grad is None or torch.all(output.aligned_target_logits.grad == 0)


def test_confidence_target_is_detached():
    output = make_output([True, True])
    dspark_loss(output, ce_alpha=0.0, l1_alpha=0.0, confidence_alpha=1.0, loss_decay_gamma=None).loss.backward()
    assert output.confidence_pred.grad.abs().sum() > 0
    assert output.draft_logits.grad is None or torch.all(output.draft_logits.grad == 0)


def test_loss_kwargs_from_config():
    dspark = loss_kwargs_from_config(DraftConfig())
    assert dspark == {"ce_alpha": 0.1, "l1_alpha": 0.9, "confidence_alpha": 1.0, "loss_decay_gamma": 4.0}
    dflash = loss_kwargs_from_config(DraftConfig(algorithm="dflash"))
    assert dflash == {"ce_alpha": 1.0, "l1_alpha": 0.0, "confidence_alpha": 0.0, "loss_decay_gamma": 4.0}
    explicit = loss_kwargs_from_config(DraftConfig(algorithm="dflash", l1_loss_alpha=0.5))
    assert explicit["l1_alpha"] == 0.5 and explicit["ce_alpha"] == 1.0

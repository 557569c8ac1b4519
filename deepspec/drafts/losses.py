"""DSpark / DFlash training loss and its metrics.

Per supervised slot k (0-indexed within its block) the weight is
``w = eval_mask * exp(-k / gamma)``. The loss mixes three weighted means that
share the denominator ``D = sum(w)``:

- CE: hard-label cross-entropy of the Markov-corrected draft logits;
- L1: ``||p_draft - p_target||_1`` (twice the total-variation distance), the
  target side coming from the frozen head and therefore without gradient;
- confidence: BCE-with-logits of the confidence head against the detached
  analytical acceptance rate ``c* = clamp(1 - L1 / 2, 0, 1)``.

The denominators are summed over ranks and the result is multiplied by the
world size, so that data-parallel gradient averaging yields the global
weighted mean of this micro-batch. Each micro-batch is normalised on its own;
gradient accumulation divides by the number of micro-batches elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from deepspec.drafts.dspark import DSparkForwardOutput

_EPS = 1e-6


@dataclass
class DSparkLossOutput:
    """The backward loss plus detached components and metrics.

    ``components`` contains the local numerators, the local and global
    denominators and the local ratios. ``metrics`` contains what a trainer logs
    (rank-local values). ``num_supervised`` is the number of supervised slots
    summed over ranks; a step where it is 0 carries no signal.
    """

    loss: torch.Tensor
    num_supervised: int
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def position_weights(block_size: int, loss_decay_gamma: float | None, device: torch.device) -> torch.Tensor:
    """Return ``exp(-k / gamma)`` for slots k = 0..bs-1, or ones when gamma is None or <= 0.

    DeepSpec's code uses exp(-k/gamma) with 0-indexed k, so slot 0 has weight 1;
    the DSpark paper writes exp(-(k-1)/gamma) for 1-indexed k with gamma
    standing for the block size. This follows the code, where gamma = 4.0 is a
    separate decay constant.
    """
    slots = torch.arange(block_size, device=device, dtype=torch.float32)
    if loss_decay_gamma is None or loss_decay_gamma <= 0:
        return torch.ones_like(slots)
    return torch.exp(-slots / loss_decay_gamma)


def dspark_loss(
    output: DSparkForwardOutput,
    *,
    ce_alpha: float,
    l1_alpha: float,
    confidence_alpha: float,
    loss_decay_gamma: float | None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
) -> DSparkLossOutput:
    """Compute the DSpark loss of one micro-batch.

    ``all_reduce`` must return the sum of its argument over ranks (None on a
    single process). The L1 term is computed only when ``l1_alpha > 0`` and
    the confidence term only when the model has a confidence head; both need
    ``output.aligned_target_logits``.
    """
    eval_mask = output.eval_mask
    mask = eval_mask.float()
    block_size = eval_mask.shape[-1]
    weights = mask * position_weights(block_size, loss_decay_gamma, eval_mask.device)
    weight_sum = weights.sum()

    draft_logits = output.draft_logits.float()
    target_logits = output.aligned_target_logits
    has_confidence = output.confidence_pred is not None
    use_l1 = l1_alpha > 0
    if target_logits is None and (use_l1 or has_confidence):
        raise ValueError("the L1 and confidence terms need aligned target logits; pass target_last_hidden_states")

    vocab = draft_logits.shape[-1]
    ce = F.cross_entropy(draft_logits.reshape(-1, vocab), output.target_ids.reshape(-1), reduction="none")
    ce_num = (weights * ce.view_as(weights)).sum()

    zero = weight_sum.new_zeros(())
    l1_num, l1_den = zero, zero
    accept_rate = None
    if target_logits is not None:
        target_probs = torch.softmax(target_logits.detach().float(), dim=-1)
        draft_probs = torch.softmax(draft_logits, dim=-1)
        l1_distance = (draft_probs - target_probs).abs().sum(dim=-1)
        accept_rate = (1.0 - 0.5 * l1_distance).clamp(0.0, 1.0).detach()
        if use_l1:
            l1_num = (weights * l1_distance).sum()
            l1_den = weight_sum

    conf_num, conf_den = zero, zero
    if has_confidence:
        assert accept_rate is not None
        bce = F.binary_cross_entropy_with_logits(output.confidence_pred.float(), accept_rate, reduction="none")
        conf_num = (weights * bce).sum()
        conf_den = weight_sum

    local = torch.stack([weight_sum, l1_den, conf_den, mask.sum()]).detach()
    reduced = all_reduce(local.clone()) if all_reduce is not None else local
    ce_den_global, l1_den_global, conf_den_global, supervised_global = reduced.unbind()

    loss = ce_alpha * ce_num / (ce_den_global + _EPS)
    if use_l1 and float(l1_den_global) > 0:
        loss = loss + l1_alpha * l1_num / (l1_den_global + _EPS)
    if has_confidence:
        loss = loss + confidence_alpha * conf_num / (conf_den_global + _EPS)
    loss = loss * world_size

    components = {
        "ce_loss_num": ce_num.detach(),
        "ce_loss_den": weight_sum,
        "ce_loss_den_global": ce_den_global,
        "ce_loss": ce_num.detach() / (weight_sum + _EPS),
        "l1_loss_num": l1_num.detach(),
        "l1_loss_den": l1_den,
        "confidence_loss_num": conf_num.detach(),
        "confidence_loss_den": conf_den,
    }
    local_loss = ce_alpha * components["ce_loss"]
    if use_l1:
        components["l1_loss"] = l1_num.detach() / (l1_den + _EPS)
        local_loss = local_loss + l1_alpha * components["l1_loss"]
    if has_confidence:
        components["confidence_loss"] = conf_num.detach() / (conf_den + _EPS)
        local_loss = local_loss + confidence_alpha * components["confidence_loss"]

    metrics: dict[str, torch.Tensor] = {"loss": local_loss, "ce_loss": components["ce_loss"]}
    for name in ("l1_loss", "confidence_loss"):
        if name in components:
            metrics[name] = components[name]
    with torch.no_grad():
        metrics.update(_accuracy_metrics(draft_logits, output.target_ids, mask))
        if accept_rate is not None:
            metrics.update(_acceptance_metrics(accept_rate, mask, output.block_keep_mask))
        if has_confidence:
            assert accept_rate is not None
            metrics.update(_confidence_metrics(output.confidence_pred.float(), accept_rate, mask, weights))
        metrics.update(_sampler_metrics(output, mask))

    return DSparkLossOutput(
        loss=loss,
        num_supervised=int(round(float(supervised_global))),
        components=components,
        metrics=metrics,
    )


def _accuracy_metrics(
    draft_logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    correct = (draft_logits.argmax(dim=-1) == target_ids).float() * mask
    metrics = {"accuracy": correct.sum() / mask.sum().clamp(min=1.0)}
    per_slot = correct.sum(dim=(0, 1)) / mask.sum(dim=(0, 1)).clamp(min=1.0)
    for slot, value in enumerate(per_slot):
        metrics[f"accuracy@{slot}"] = value
    return metrics


def _acceptance_metrics(
    accept_rate: torch.Tensor, mask: torch.Tensor, block_keep_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    metrics: dict[str, torch.Tensor] = {}
    per_slot = (accept_rate * mask).sum(dim=(0, 1)) / mask.sum(dim=(0, 1)).clamp(min=1.0)
    for slot, value in enumerate(per_slot):
        metrics[f"accept_rate@{slot}"] = value
    # Expected accepted length of a block with the bonus token: 1 + sum_k prod_{i<=k} c*_i.
    block_tau = 1.0 + (accept_rate * mask).cumprod(dim=-1).sum(dim=-1)
    counted = block_keep_mask & (mask.sum(dim=-1) > 0)
    metrics["tau_probabilistic"] = (block_tau * counted).sum() / counted.sum().clamp(min=1)
    return metrics


def _confidence_metrics(
    confidence_logits: torch.Tensor, accept_rate: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    predicted = torch.sigmoid(confidence_logits)
    weight_sum = weights.sum() + _EPS
    cumprod_gap = (predicted * mask).cumprod(dim=-1) - (accept_rate * mask).cumprod(dim=-1)
    return {
        "confidence_abs_error": (weights * (predicted - accept_rate).abs()).sum() / weight_sum,
        "confidence_bias": (weights * (predicted - accept_rate)).sum() / weight_sum,
        "confidence_cumprod_bias": (weights * cumprod_gap).sum() / weight_sum,
    }


def _sampler_metrics(output: DSparkForwardOutput, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    num_blocks, block_size = mask.shape[1], mask.shape[2]
    valid = output.num_valid_anchors.float()
    kept_blocks = output.block_keep_mask.float().sum(dim=1)
    supervised_per_block = mask.sum(dim=(1, 2)) / kept_blocks.clamp(min=1.0)
    return {
        "valid_anchors_abs": valid.mean(),
        "valid_anchors_ratio": (valid / output.seq_len).mean(),
        "sampled_anchors_abs": kept_blocks.mean(),
        "sampled_anchors_ratio": (kept_blocks / num_blocks).mean(),
        "block_supervised_tokens_abs": supervised_per_block.mean(),
        "block_supervised_tokens_ratio": (supervised_per_block / block_size).mean(),
    }


def loss_kwargs_from_config(draft: Any) -> dict[str, float | None]:
    """Map a pipeline ``DraftConfig`` to ``dspark_loss`` keyword arguments.

    The config resolves the algorithm's defaults (DFlash: cross-entropy weight
    1.0, L1 weight 0 and no confidence head).
    """
    gamma = draft.loss_decay_gamma
    if gamma is not None and not math.isfinite(gamma):
        raise ValueError(f"draft.loss_decay_gamma must be a finite number or null, got {gamma}")
    return {
        "ce_alpha": draft.ce_loss_alpha,
        "l1_alpha": draft.l1_loss_alpha,
        "confidence_alpha": draft.confidence_head_alpha,
        "loss_decay_gamma": gamma,
    }

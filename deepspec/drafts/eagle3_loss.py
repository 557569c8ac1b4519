"""Eagle3 training loss over the training-time-test steps, and its metrics.

Step ``k`` contributes the soft cross-entropy ``-sum_v p_target(v) log
softmax(draft)(v)``, summed over the positions its mask supervises and
divided by ``B*T``. Padding therefore counts in the denominator, and at batch
size 1 every sequence weighs the same. The total is ``sum_k decay**k * step_k``.
Under data parallelism each rank's loss is its local mean, so averaging the
gradients over ranks averages the losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepspec.config.schema import DraftConfig
from deepspec.drafts.eagle3 import Eagle3ForwardOutput


@dataclass
class Eagle3LossOutput:
    """The backward loss plus detached per-step components and metrics.

    ``components`` has ``ploss_k`` for every step. ``metrics`` has the values
    DeepSpec logs: ``accuracy@k``, ``accept_rate@k``, ``valid_tokens@k``,
    ``tau_greedy`` and ``tau_probabilistic``. ``num_supervised`` is the
    number of positions supervised at step 0, because every later step
    supervises a subset of them. A batch where it is 0 carries no signal.
    """

    loss: torch.Tensor
    num_supervised: int
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def step_weights(ttt_length: int, step_loss_decay: float) -> list[float]:
    """Return the loss weight ``decay**k`` of each step k = 0..ttt_length-1."""
    return [step_loss_decay**step for step in range(ttt_length)]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Return ``-sum_v p(v) log softmax(logits)(v)`` per row, in float32."""
    return -(target_probs * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    return (values * valid).sum() / count.clamp(min=1)


@torch.no_grad()
def step_metrics(
    logits: torch.Tensor, target_probs: torch.Tensor, target_argmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per position whether the draft's argmax equals the target's, and the acceptance rate.

    The acceptance rate is ``clamp(1 - ||p_draft - p_target||_1 / 2, 0, 1)``,
    the probability that speculative sampling accepts a draft token.
    """
    if target_argmax is None:
        target_argmax = target_probs.argmax(dim=-1)
    correct = logits.argmax(dim=-1) == target_argmax
    distance = (torch.softmax(logits.float(), dim=-1) - target_probs).abs().sum(dim=-1)
    accept = (1.0 - 0.5 * distance).clamp(0.0, 1.0)
    return correct, accept


def eagle3_loss(output: Eagle3ForwardOutput, *, step_loss_decay: float) -> Eagle3LossOutput:
    """Compute the Eagle3 loss of one micro-batch and its metrics."""
    steps = len(output.draft_logits)
    if steps == 0:
        raise ValueError("the forward output has no TTT steps; ttt_length must be >= 1")
    batch, seq_len = output.position_masks[0].shape
    normalizer = float(batch * seq_len)
    weights = step_weights(steps, step_loss_decay)

    loss = output.draft_logits[0].new_zeros((), dtype=torch.float32)
    components: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}
    correct_chain: torch.Tensor | None = None
    accept_chain: torch.Tensor | None = None
    tau_greedy = tau_probabilistic = None
    for step, (logits, target, mask) in enumerate(
        zip(output.draft_logits, output.target_probs, output.position_masks, strict=True)
    ):
        valid = mask > 0
        per_position = soft_cross_entropy(logits, target)
        step_loss = torch.where(valid, per_position, torch.zeros_like(per_position)).sum() / normalizer
        loss = loss + weights[step] * step_loss
        components[f"ploss_{step}"] = step_loss.detach()

        target_argmax = output.target_argmax[step] if output.target_argmax else None
        correct, accept = step_metrics(logits, target, target_argmax)
        metrics[f"accuracy@{step}"] = _masked_mean(correct.float(), valid)
        metrics[f"accept_rate@{step}"] = _masked_mean(accept, valid)
        metrics[f"valid_tokens@{step}"] = valid.sum().float()
        # Expected accepted length of a chain starting at a step-0 position: 1 + sum_k prod_{j<=k} a_j,
        # where a position that step j does not supervise ends the chain.
        correct_step = (correct & valid).float()
        accept_step = torch.where(valid, accept, torch.zeros_like(accept))
        correct_chain = correct_step if correct_chain is None else correct_chain * correct_step
        accept_chain = accept_step if accept_chain is None else accept_chain * accept_step
        tau_greedy = correct_chain if tau_greedy is None else tau_greedy + correct_chain
        tau_probabilistic = accept_chain if tau_probabilistic is None else tau_probabilistic + accept_chain

    assert tau_greedy is not None and tau_probabilistic is not None
    first_valid = output.position_masks[0] > 0
    metrics["tau_greedy"] = 1.0 + _masked_mean(tau_greedy, first_valid)
    metrics["tau_probabilistic"] = 1.0 + _masked_mean(tau_probabilistic, first_valid)
    metrics["loss"] = loss.detach()
    metrics.update({name: value for name, value in components.items()})
    return Eagle3LossOutput(loss=loss, num_supervised=int(first_valid.sum()), components=components, metrics=metrics)


def eagle3_loss_kwargs(draft: DraftConfig) -> dict[str, float]:
    """Map a pipeline ``DraftConfig`` to ``eagle3_loss`` keyword arguments."""
    return {"step_loss_decay": draft.step_loss_decay}

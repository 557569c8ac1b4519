"""AdamW with linear warmup and cosine decay."""

from __future__ import annotations

import math

import torch

from deepspec.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], settings: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.999))


def lr_factor(step: int, settings: TrainConfig) -> float:
    """Return the LR multiplier for optimizer step ``step`` (1-indexed, as in the reference schedule)."""
    warmup = int(settings.warmup_ratio * settings.max_steps)
    if warmup > 0 and step <= warmup:
        return step / warmup
    decay_steps = max(settings.max_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, step: int, settings: TrainConfig) -> float:
    lr = settings.lr * lr_factor(step, settings)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

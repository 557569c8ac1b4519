"""Start a draft from its target: frozen copies of the embedding and LM head, and the target's final norm."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig

DraftModel = TypeVar("DraftModel", bound=nn.Module)


def instantiate_from_target(
    model_class: type[DraftModel],
    config: PretrainedConfig,
    *,
    seed: int,
    embed: nn.Module,
    head: nn.Module,
    norm: nn.Module | None,
) -> DraftModel:
    """Build ``model_class(config)`` in float32 and copy the target's embedding, LM head and final norm into it.

    The other weights come from the Hugging Face initialisation under
    ``torch.manual_seed(seed)``; the global RNG state is restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = model_class(config).float()
    config.dtype = torch.float32

    if tuple(embed.weight.shape) != tuple(draft.embed_tokens.weight.shape):
        raise ValueError(
            f"target input embedding has shape {tuple(embed.weight.shape)}, expected "
            f"{tuple(draft.embed_tokens.weight.shape)} from its config (vocab_size x hidden_size)"
        )
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(embed.weight)
        draft.lm_head.weight.copy_(head.weight)
        # The draft's final norm starts from the target's scale instead of ones, so the frozen LM head
        # gets inputs on the target's scale from the first step. On tiny CPU models this speeds up
        # early training.
        if norm is not None and getattr(norm, "weight", None) is not None:
            draft.norm.weight.copy_(norm.weight)
    return draft

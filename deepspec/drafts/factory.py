"""Build the configured draft for a target from the pipeline config."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deepspec.config import ConfigError, PipelineConfig
from deepspec.drafts.dspark import build_draft


def resolve_mask_token_id(config: PipelineConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """Return ``draft.mask_token_id``, else the tokenizer's mask token id."""
    if config.draft.mask_token_id is not None:
        return config.draft.mask_token_id
    if tokenizer.mask_token_id is None:
        raise ConfigError(
            "draft.mask_token_id is not set and the target tokenizer has no mask token; set draft.mask_token_id to a "
            "reserved token id of the target vocabulary (Qwen3 uses 151669)"
        )
    return int(tokenizer.mask_token_id)


def build_draft_for_config(
    config: PipelineConfig, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, seed: int
) -> PreTrainedModel:
    """Build a freshly initialised draft of the configured algorithm and shape for ``target``."""
    draft = config.draft
    sequential = draft.algorithm == "dspark"
    return build_draft(
        target,
        layer_ids=list(config.cache.layer_ids),
        block_size=draft.block_size,
        num_layers=draft.num_layers,
        num_anchors=draft.num_anchors,
        markov_rank=draft.markov_rank if sequential else 0,
        markov_head_type=draft.markov_head_type,
        enable_confidence_head=sequential and draft.confidence_head_alpha > 0,
        confidence_head_with_markov=draft.confidence_head_with_markov,
        mask_token_id=resolve_mask_token_id(config, tokenizer),
        seed=seed,
    )

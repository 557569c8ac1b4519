"""Build the configured draft for a target from the pipeline config."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deepspec.config import ConfigError, PipelineConfig
from deepspec.drafts.dspark import build_draft, draft_kwargs_from_config
from deepspec.drafts.eagle3 import build_eagle3_draft, eagle3_kwargs_from_config


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
    if config.draft.algorithm == "eagle3":
        return build_eagle3_draft(
            target, **eagle3_kwargs_from_config(config.draft, layer_ids=list(config.cache.layer_ids), seed=seed)
        )
    kwargs = draft_kwargs_from_config(
        config.draft,
        layer_ids=list(config.cache.layer_ids),
        mask_token_id=resolve_mask_token_id(config, tokenizer),
        seed=seed,
    )
    return build_draft(target, **kwargs)

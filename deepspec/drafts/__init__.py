"""Draft models for speculative decoding: DSpark / DFlash for Qwen3 targets."""

from deepspec.drafts.base import Drafter, Proposal
from deepspec.drafts.checkpoint import check_draft_matches_target, load_draft, save_draft
from deepspec.drafts.dspark import (
    DSparkConfig,
    DSparkForwardOutput,
    DSparkModel,
    Qwen3DSparkModel,
    build_draft,
    draft_kwargs_from_config,
)
from deepspec.drafts.dspark_drafter import DSparkDrafter
from deepspec.drafts.losses import DSparkLossOutput, dspark_loss, loss_kwargs_from_config

__all__ = [
    "DSparkConfig",
    "DSparkDrafter",
    "DSparkForwardOutput",
    "DSparkLossOutput",
    "DSparkModel",
    "Drafter",
    "Proposal",
    "Qwen3DSparkModel",
    "build_draft",
    "check_draft_matches_target",
    "draft_kwargs_from_config",
    "dspark_loss",
    "load_draft",
    "loss_kwargs_from_config",
    "save_draft",
]

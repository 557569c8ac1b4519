"""Draft models for speculative decoding: DSpark / DFlash and Eagle3, for Qwen3 and Gemma4 targets."""

from deepspec.drafts.base import Drafter, Proposal
from deepspec.drafts.checkpoint import check_draft_matches_target, load_draft, save_draft, save_reference_draft
from deepspec.drafts.dspark import (
    DSparkConfig,
    DSparkForwardOutput,
    DSparkModel,
    Qwen3DSparkModel,
    build_draft,
    draft_kwargs_from_config,
)
from deepspec.drafts.dspark_backbone import DSparkModelBase
from deepspec.drafts.dspark_drafter import DSparkDrafter
from deepspec.drafts.dspark_gemma4 import Gemma4DSparkConfig, Gemma4DSparkModel, build_gemma4_draft
from deepspec.drafts.eagle3 import (
    Eagle3Config,
    Gemma4Eagle3Config,
    Gemma4Eagle3Model,
    Qwen3Eagle3Model,
    build_eagle3_draft,
)
from deepspec.drafts.eagle3_drafter import Eagle3Drafter
from deepspec.drafts.eagle3_loss import eagle3_loss
from deepspec.drafts.losses import DSparkLossOutput, dspark_loss, loss_kwargs_from_config

__all__ = [
    "DSparkConfig",
    "DSparkDrafter",
    "DSparkForwardOutput",
    "DSparkLossOutput",
    "DSparkModel",
    "DSparkModelBase",
    "Drafter",
    "Eagle3Config",
    "Eagle3Drafter",
    "Gemma4Eagle3Config",
    "Gemma4Eagle3Model",
    "Gemma4DSparkConfig",
    "Gemma4DSparkModel",
    "Proposal",
    "Qwen3DSparkModel",
    "Qwen3Eagle3Model",
    "build_draft",
    "build_eagle3_draft",
    "build_gemma4_draft",
    "check_draft_matches_target",
    "draft_kwargs_from_config",
    "dspark_loss",
    "eagle3_loss",
    "load_draft",
    "loss_kwargs_from_config",
    "save_draft",
    "save_reference_draft",
]

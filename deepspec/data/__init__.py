"""Prompt data: sources, canonical conversation records, the train/held-out split, chat rendering and loss masks."""

from deepspec.data.chat import (
    ChatTemplateError,
    TrainingExample,
    render_chat_text,
    render_prompt_ids,
    render_training_example,
    shift_left,
)
from deepspec.data.records import Conversation, Message, Rejection, conversation_id, normalize_row, split_of
from deepspec.data.sources import HF_MIRROR_ENV, describe_source, iter_source_rows
from deepspec.data.stage import HELDOUT_FILE, TRAIN_FILE, read_records, run_prompts

__all__ = [
    "HELDOUT_FILE",
    "HF_MIRROR_ENV",
    "TRAIN_FILE",
    "ChatTemplateError",
    "Conversation",
    "Message",
    "Rejection",
    "TrainingExample",
    "conversation_id",
    "describe_source",
    "iter_source_rows",
    "normalize_row",
    "read_records",
    "render_chat_text",
    "render_prompt_ids",
    "render_training_example",
    "run_prompts",
    "shift_left",
    "split_of",
]

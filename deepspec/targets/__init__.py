"""Target models: loading by config, layer lookup, and the toy target built on CPU."""

from deepspec.targets.loading import (
    decoder_layers,
    end_token_ids,
    final_norm,
    hidden_size,
    load_target,
    load_tokenizer,
    num_target_layers,
    resolve_target,
    validate_layer_ids,
)
from deepspec.targets.toy import (
    CHAT_TEMPLATE,
    MASK_TOKEN,
    continuation_split,
    conversation_messages,
    ensure_toy_target,
    read_corpus_rows,
    toy_cache_root,
)

__all__ = [
    "CHAT_TEMPLATE",
    "MASK_TOKEN",
    "continuation_split",
    "conversation_messages",
    "decoder_layers",
    "end_token_ids",
    "ensure_toy_target",
    "final_norm",
    "hidden_size",
    "load_target",
    "load_tokenizer",
    "num_target_layers",
    "read_corpus_rows",
    "resolve_target",
    "toy_cache_root",
    "validate_layer_ids",
]

"""System turns under a chat template that rejects them (Gemma-style), for regen, cache and eval alike."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deepspec.data.chat import (
    ChatTemplateError,
    apply_system_prompt_policy,
    render_chat_text,
    render_prompt_ids,
    render_training_example,
    template_accepts_system,
)

GEMMA_STYLE_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{- '<|im_start|>' + role + '\\n' + (m.content or '') + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>model\\n' -}}{%- endif -%}"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How many eggs?"},
    {"role": "assistant", "content": "Three eggs."},
]


@pytest.fixture(scope="module")
def gemma_style(tiny_target_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    tokenizer.chat_template = GEMMA_STYLE_TEMPLATE
    return tokenizer


def test_keep_raises_naming_the_setting(gemma_style):
    assert not template_accepts_system(gemma_style)
    with pytest.raises(ChatTemplateError, match="regen.system_prompt_policy"):
        render_prompt_ids(gemma_style, CONVERSATION[:2])


def test_fold_into_first_user_turn(gemma_style):
    folded = apply_system_prompt_policy(gemma_style, CONVERSATION, "fold_into_first_user")
    assert folded == [
        {"role": "user", "content": "Answer briefly.\n\nHow many eggs?"},
        {"role": "assistant", "content": "Three eggs."},
    ]
    text = render_chat_text(gemma_style, CONVERSATION[:2], True, system_prompt_policy="fold_into_first_user")
    assert text == "<|im_start|>user\nAnswer briefly.\n\nHow many eggs?<|im_end|>\n<|im_start|>model\n"


def test_skip_drops_system_turns(gemma_style):
    ids = render_prompt_ids(gemma_style, CONVERSATION[:2], system_prompt_policy="skip")
    assert ids == render_prompt_ids(gemma_style, CONVERSATION[1:2])


def test_training_example_matches_prompt_policy(gemma_style):
    example = render_training_example(gemma_style, CONVERSATION, 256, system_prompt_policy="fold_into_first_user")
    prompt = render_prompt_ids(gemma_style, CONVERSATION[:2], system_prompt_policy="fold_into_first_user")
    assert example.input_ids[: len(prompt)] == prompt
    assert example.loss_mask[: len(prompt)] == [0] * len(prompt)
    assert sum(example.loss_mask) > 0


def test_templates_that_accept_system_turns_keep_them(tiny_target_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_target_dir)
    assert apply_system_prompt_policy(tokenizer, CONVERSATION, "skip") == CONVERSATION

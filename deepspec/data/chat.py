"""Chat rendering for regeneration, the target cache and evaluation, and the training loss mask.

The tokenizer's own chat template decides every token: no system prompt is
added, and ``enable_thinking=False`` is passed to every rendering (templates
without that variable ignore it). Prompts for generation and the prompt part
of training sequences therefore come from the same template call.

Loss mask: 1 on the content tokens of every assistant turn plus the tokens
that end the turn (for a Qwen-style template, ``<|im_end|>`` and ``\\n``), 0
everywhere else. To find the span of assistant turn ``i`` in the rendered
text, ``messages[:i]`` is rendered with the generation prompt and
``messages[:i+1]`` without it. The first is a prefix of the second, and the
difference is the answer plus its end-of-turn text. Character spans become
token positions through the fast tokenizer's offset mapping, so the mask
always matches the tokens of the full rendering.

Some templates render earlier turns differently once the conversation goes on
(Qwen3's chat template puts an empty ``<think>`` block only in front of the
answers after the last user turn). Then ``messages[:i+1]`` is not a prefix
of the full rendering, and the answer is located right after the unchanged
history instead. If that fails too, :class:`ChatTemplateError` names the
template.

Thinking: an assistant turn may carry ``reasoning_content`` (what a thinking
target wrote inside its think block). It is passed to the template, which
decides where it goes (Qwen3's template renders it in a ``<think>`` block in
front of the answers after the last user turn and drops it from earlier ones).

System turns: some templates (Gemma's) raise on a ``system`` message. The
``system_prompt_policy`` argument says what to do then: ``keep`` raises
:class:`ChatTemplateError`, ``fold_into_first_user`` prepends the system text
to the first user turn and ``skip`` drops it. Templates that accept system
turns always get them unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jinja2.exceptions import TemplateError

from deepspec.data.records import Rejection

Overlong = Literal["drop", "truncate_left"]
SystemPromptPolicy = Literal["keep", "fold_into_first_user", "skip"]
SYSTEM_PROMPT_POLICIES: tuple[str, ...] = ("keep", "fold_into_first_user", "skip")
REASONING_KEY = "reasoning_content"

# Whether a chat template (keyed by its sha256) renders a system turn without raising.
_ACCEPTS_SYSTEM: dict[str, bool] = {}


class ChatTemplateError(RuntimeError):
    """The chat template renders conversations in a way the loss-mask logic cannot follow."""


class SystemPromptError(ChatTemplateError, ValueError):
    """The chat template raises on a system turn and ``regen.system_prompt_policy`` is ``keep``."""


@dataclass(frozen=True)
class TrainingExample:
    """One tokenised conversation and its loss mask (1 on tokens the draft learns to predict)."""

    input_ids: list[int]
    loss_mask: list[int]
    # Leading messages removed by ``overlong="truncate_left"`` (0 when nothing was cut).
    dropped_messages: int = 0

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def render_chat_text(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool,
    system_prompt_policy: SystemPromptPolicy = "keep",
    enable_thinking: bool = False,
) -> str:
    """Render ``messages`` with the tokenizer's chat template (thinking disabled unless requested)."""
    plain = apply_system_prompt_policy(tokenizer, _plain_messages(messages), system_prompt_policy)
    return tokenizer.apply_chat_template(
        plain,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )


def render_prompt_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    system_prompt_policy: SystemPromptPolicy = "keep",
    enable_thinking: bool = False,
) -> list[int]:
    """Return the token ids of ``messages`` followed by the template's generation prompt."""
    text = render_chat_text(
        tokenizer,
        messages,
        add_generation_prompt=True,
        system_prompt_policy=system_prompt_policy,
        enable_thinking=enable_thinking,
    )
    # verbose=False: callers compare the length with their own limit and reject long prompts.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def render_training_example(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    max_length: int,
    overlong: Overlong = "drop",
    min_loss_tokens: int = 1,
    system_prompt_policy: SystemPromptPolicy = "keep",
) -> TrainingExample | Rejection:
    """Tokenise a finished conversation and build its loss mask.

    Returns a :class:`Rejection` for records that cannot be trained on:
    ``missing_answer`` (an assistant turn without content), ``no_assistant_turn``,
    ``too_long`` (longer than ``max_length`` tokens, after left truncation when
    ``overlong="truncate_left"``) and ``too_few_loss_tokens``. Raises
    :class:`ChatTemplateError` when the template and the mask logic disagree.
    """
    if overlong not in ("drop", "truncate_left"):
        raise ValueError(f"overlong must be 'drop' or 'truncate_left', got {overlong!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    _require_fast(tokenizer)
    plain = apply_system_prompt_policy(tokenizer, _plain_messages(messages), system_prompt_policy)
    roles = [message["role"] for message in plain]
    if "assistant" not in roles:
        return Rejection("no_assistant_turn", "the conversation has no assistant turn to learn from")
    for index, message in enumerate(plain):
        if message["role"] == "assistant" and message["content"] is None:
            return Rejection("missing_answer", f"assistant message {index} has no content")

    example = _render_masked(tokenizer, plain)
    if len(example.input_ids) > max_length:
        if overlong == "drop":
            return Rejection("too_long", f"{len(example.input_ids)} tokens > max_length={max_length}")
        truncated = _truncate_left(tokenizer, plain, max_length)
        if isinstance(truncated, Rejection):
            detail = f"{len(example.input_ids)} tokens > max_length={max_length}, and {truncated.detail}"
            return Rejection("too_long", detail)
        example = truncated
    if example.num_loss_tokens < min_loss_tokens:
        return Rejection(
            "too_few_loss_tokens", f"{example.num_loss_tokens} supervised tokens < min_loss_tokens={min_loss_tokens}"
        )
    return example


def shift_left(mask: Sequence[int] | torch.Tensor) -> list[int] | torch.Tensor:
    """Turn a per-token loss mask into a next-token mask: position t is trained when token t+1 is supervised.

    Works on a list or on a tensor of any rank (shifted along the last dimension).
    """
    if isinstance(mask, torch.Tensor):
        shifted = torch.zeros_like(mask)
        shifted[..., :-1] = mask[..., 1:]
        return shifted
    values = list(mask)
    return values[1:] + [0] if values else []


def apply_system_prompt_policy(
    tokenizer: Any, messages: Sequence[dict[str, Any]], policy: SystemPromptPolicy
) -> list[dict[str, Any]]:
    """Return ``messages`` ready for the template: system turns unchanged if it accepts them, else per ``policy``."""
    if policy not in SYSTEM_PROMPT_POLICIES:
        raise ValueError(f"system_prompt_policy must be one of {SYSTEM_PROMPT_POLICIES}, got {policy!r}")
    systems = [message for message in messages if message["role"] == "system"]
    if not systems or template_accepts_system(tokenizer):
        return list(messages)
    if policy == "keep":
        raise SystemPromptError(
            f"{_template_name(tokenizer)} raises on a system turn and regen.system_prompt_policy is keep; set "
            "regen.system_prompt_policy to fold_into_first_user (prepend the system text to the first user turn) "
            "or skip (drop system turns)"
        )
    rest = [dict(message) for message in messages if message["role"] != "system"]
    if policy == "fold_into_first_user":
        system_text = "\n\n".join(str(message["content"] or "") for message in systems)
        for message in rest:
            if message["role"] == "user":
                message["content"] = f"{system_text}\n\n{message['content'] or ''}"
                break
    return rest


def template_accepts_system(tokenizer: Any) -> bool:
    """Return whether the tokenizer's chat template renders a system turn without raising."""
    template = getattr(tokenizer, "chat_template", None)
    key = hashlib.sha256(str(template).encode("utf-8")).hexdigest()
    if key not in _ACCEPTS_SYSTEM:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            _ACCEPTS_SYSTEM[key] = True
        except TemplateError:
            _ACCEPTS_SYSTEM[key] = False
    return _ACCEPTS_SYSTEM[key]


def _plain_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    plain = []
    for message in messages:
        entry = {"role": message["role"], "content": message["content"]}
        if message.get(REASONING_KEY):
            entry[REASONING_KEY] = message[REASONING_KEY]
        plain.append(entry)
    return plain


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{_template_name(tokenizer)}: the loss mask needs a fast tokenizer with offset mapping, got "
            f"{type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _template_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"chat template of tokenizer {name!r}"


def _truncate_left(tokenizer: Any, messages: list[dict[str, Any]], max_length: int) -> TrainingExample | Rejection:
    """Drop whole leading turns until the rest fits, keeping a system message and a user turn first."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    user_starts = [index for index, message in enumerate(body) if message["role"] == "user"]
    length = None
    for start in user_starts[1:]:
        candidate = head + body[start:]
        length = len(tokenizer(render_chat_text(tokenizer, candidate, False), add_special_tokens=False)["input_ids"])
        if length <= max_length:
            return replace(_render_masked(tokenizer, candidate), dropped_messages=start)
    if length is None:
        return Rejection("too_long", "the conversation has one turn, so left truncation cannot shorten it")
    return Rejection("too_long", f"the last turn alone is {length} tokens")


def _render_masked(tokenizer: Any, messages: list[dict[str, Any]]) -> TrainingExample:
    full = render_chat_text(tokenizer, messages, add_generation_prompt=False)
    spans = [
        (index, _assistant_span(tokenizer, messages, index, full))
        for index, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    loss_mask = [0] * len(input_ids)
    for index, (start, end) in spans:
        supervised = 0
        for position, (token_start, token_end) in enumerate(offsets):
            # A token that straddles the span edge (a merged newline, say) is supervised.
            if token_end > token_start and token_end > start and token_start < end:
                loss_mask[position] = 1
                supervised += 1
        if supervised == 0 and messages[index]["content"]:
            raise ChatTemplateError(
                f"{_template_name(tokenizer)}: assistant message {index} has content but its rendered span "
                f"[{start}, {end}) covers no token; the template and the loss-mask logic disagree"
            )
    return TrainingExample(input_ids=input_ids, loss_mask=loss_mask)


def _assistant_span(tokenizer: Any, messages: list[dict[str, Any]], index: int, full: str) -> tuple[int, int]:
    """Return the character span of assistant message ``index`` (answer plus end of turn) in ``full``."""
    if messages[index].get(REASONING_KEY):
        # A turn written with thinking on: its prompt is the generation prompt with thinking enabled, and the
        # span covers the think block. Templates that drop reasoning from history turns render the answer alone,
        # which the plain path below finds.
        prompt = render_chat_text(tokenizer, messages[:index], add_generation_prompt=True, enable_thinking=True)
        with_answer = render_chat_text(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if with_answer.startswith(prompt) and full.startswith(with_answer):
            return len(prompt), len(with_answer)
        without = {"role": "assistant", "content": messages[index]["content"]}
        messages = [*messages[:index], without, *messages[index + 1 :]]
    prompt = render_chat_text(tokenizer, messages[:index], add_generation_prompt=True)
    with_answer = render_chat_text(tokenizer, messages[: index + 1], add_generation_prompt=False)
    if not with_answer.startswith(prompt):
        raise ChatTemplateError(
            f"{_template_name(tokenizer)}: rendering messages[:{index}] with the generation prompt is not a prefix "
            f"of rendering messages[:{index + 1}], so the answer's position is unknown; "
            f"generation prompt ends {prompt[-40:]!r}, "
            f"the conversation continues {with_answer[len(prompt) - 40 :][:80]!r}"
        )
    if full.startswith(with_answer):
        return len(prompt), len(with_answer)

    # The template rewrites this turn once later turns follow. Find the answer and its end of turn right after
    # the unchanged history, no further away than the generation prompt reaches.
    # NOTE: assumes a history turn's header is no longer than the generation prompt, true for Qwen3's template.
    history = render_chat_text(tokenizer, messages[:index], add_generation_prompt=False)
    answer = with_answer[len(prompt) :]
    if full.startswith(history):
        for start in range(len(history), len(prompt) + 1):
            if full.startswith(answer, start):
                return start, start + len(answer)
    raise ChatTemplateError(
        f"{_template_name(tokenizer)}: the template renders assistant message {index} differently once later "
        f"turns follow, and its text {answer[:60]!r} was not found after the earlier turns; this template "
        "rewrites history in a way the loss mask cannot follow"
    )

"""Canonical conversation records, row normalisation, content ids and the train/held-out split.

Every prompt source is turned into one shape::

    {"id": str, "source": str,
     "messages": [{"role": "system" | "user" | "assistant", "content": str | None}, ...]}

The messages are an optional leading system message followed by strictly
alternating user and assistant turns, starting with a user turn and ending with
an assistant turn. An assistant turn whose content is None is left for the
``regen`` stage to write. A trailing user turn gets such an empty assistant turn
appended, so every question has a slot for its answer.

Accepted row shapes:

- ``{"messages": [...]}`` and ``{"conversations": [...]}`` with ``role``/``content``
  keys, or ShareGPT ``from``/``value`` keys;
- ``{"turns": [str, ...]}`` (benchmark files): every string is a user turn, each
  followed by an assistant turn to be generated.

Rows that cannot be used are returned as a :class:`Rejection` with a reason
instead of raising, so one bad row does not stop a stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

Role = Literal["system", "user", "assistant"]
Split = Literal["train", "heldout"]

ID_HEX_CHARS = 20

# ShareGPT speaker names and chat roles, mapped to the three canonical roles.
ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


class Message(TypedDict):
    role: Role
    content: str | None


class Conversation(TypedDict):
    id: str
    source: str
    messages: list[Message]


@dataclass(frozen=True)
class Rejection:
    """A row or record that a stage drops, with a machine-readable reason and a human-readable detail."""

    reason: str
    detail: str = ""
    record_id: str | None = None
    row: Any = None


class _RowError(Exception):
    """Internal signal: the row is unusable for ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def normalize_row(row: Any, source: str) -> Conversation | Rejection:
    """Convert one source row into a canonical conversation, or return a Rejection with the reason."""
    try:
        messages = _messages_of(row)
        _check_order(messages)
    except _RowError as error:
        return Rejection(error.reason, error.detail, row=row)
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": None})
    return {"id": conversation_id(messages), "source": source, "messages": messages}


def conversation_id(messages: list[Message]) -> str:
    """Hash the system and user turns into a hex id.

    Assistant turns are left out because ``regen`` rewrites them: the same
    question keeps the same id whatever answer a source ships with it.
    """
    prompt = [[message["role"], message["content"]] for message in messages if message["role"] != "assistant"]
    payload = json.dumps(prompt, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def split_of(record_id: str, heldout_fraction: float, salt: str) -> Split:
    """Assign a record to ``train`` or ``heldout`` from a hash of the salt and its id only.

    The result does not depend on row order, on how the rows are sharded, or on
    the other records, so every rank and every rerun agrees.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be within [0, 1], got {heldout_fraction}")
    digest = hashlib.sha256(f"{salt}\x00{record_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if position < heldout_fraction else "train"


def _messages_of(row: Any) -> list[Message]:
    if not isinstance(row, dict):
        raise _RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return _chat_messages(row["messages"], "messages")
    if "conversations" in row:
        return _chat_messages(row["conversations"], "conversations")
    if "turns" in row:
        return _benchmark_turns(row["turns"])
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise _RowError("no_conversation", f"the row has no messages, conversations or turns key (keys: {keys})")


def _chat_messages(raw: Any, key: str) -> list[Message]:
    if not isinstance(raw, list):
        raise _RowError("invalid_messages", f"{key} must be a list, got {type(raw).__name__}")
    messages: list[Message] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise _RowError("invalid_messages", f"{key}[{index}] must be an object, got {type(entry).__name__}")
        if "role" in entry:
            speaker, content = entry.get("role"), entry.get("content")
        elif "from" in entry:
            speaker, content = entry.get("from"), entry.get("value")
        else:
            raise _RowError("invalid_messages", f"{key}[{index}] has neither a role nor a from key")
        role = ROLE_ALIASES.get(str(speaker).strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _RowError("unknown_role", f"{key}[{index}] has role {speaker!r}")
        text = _content_text(content, f"{key}[{index}]")
        if role == "system" and (text is None or not text.strip()):
            # An empty system turn carries no instruction, so it is dropped instead of rendered.
            continue
        messages.append({"role": role, "content": text})
    return messages


def _benchmark_turns(turns: Any) -> list[Message]:
    if not isinstance(turns, list):
        raise _RowError("invalid_messages", f"turns must be a list of strings, got {type(turns).__name__}")
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        if turn is not None and not isinstance(turn, str):
            raise _RowError("invalid_content", f"turns[{index}] must be a string, got {type(turn).__name__}")
        messages.append({"role": "user", "content": turn})
        messages.append({"role": "assistant", "content": None})
    return messages


def _content_text(content: Any, where: str) -> str | None:
    """Return the text of a content field: a string, a list of text parts, or None."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _RowError("non_text_content", f"{where}.content[{index}] is not a text part (type {kind!r})")
            texts.append(part["text"])
        return "".join(texts)
    raise _RowError("invalid_content", f"{where}.content must be a string, a list of parts or null")


def _check_order(messages: list[Message]) -> None:
    if not messages:
        raise _RowError("empty_conversation", "the conversation has no messages")
    previous: Role | None = None
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system" and index > 0:
            detail = f"message {index} is a system message, but only the first message may be one"
            raise _RowError("system_not_first", detail)
        if role == "user" and (message["content"] is None or not message["content"].strip()):
            raise _RowError("empty_user_content", f"message {index} is a user turn with empty content")
        if role == "assistant" and previous in (None, "system"):
            raise _RowError("starts_with_assistant", f"message {index} is an assistant turn before any user turn")
        if role == "user" and previous == "user":
            # Regenerating turn by turn would merge or drop one of the two questions.
            raise _RowError("consecutive_user_turns", f"messages {index - 1} and {index} are both user turns")
        if role == "assistant" and previous == "assistant":
            raise _RowError("consecutive_assistant_turns", f"messages {index - 1} and {index} are both assistant turns")
        previous = role
    if previous == "system":
        raise _RowError("empty_conversation", "the conversation has a system message but no user turn")

"""Regeneration through OpenAI-compatible chat servers (vLLM, SGLang), turn by turn.

Each record is rebuilt as the target would have written it: its system turns
are kept, its given assistant turns are dropped, and every user turn is sent
with the conversation so far (earlier answers are the regenerated ones). One
request per user turn. A record is either kept whole, rejected with a reason,
or failed (a request error); partial conversations are never returned.

Thinking: when the server returns the reasoning separately (a reasoning parser
such as vLLM's ``--reasoning-parser qwen3``) or the content contains the closing
think tag, the answer is stored as ``content`` and the reasoning, stripped of
the newlines around it, as ``reasoning_content``. Rendering that turn with a
Qwen3-style chat template (``<think>\\n`` reasoning ``\\n</think>\\n\\n`` answer)
gives back the text the target produced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from deepspec.config import RegenConfig
from deepspec.data.chat import REASONING_KEY, apply_system_prompt_policy, render_prompt_ids
from deepspec.regen.openai_client import (
    ChatResult,
    ClientSettings,
    Endpoint,
    OpenAIChatClient,
    RegenAborted,
    RequestFailed,
    SamplingParams,
)

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Reject reasons, in the order they are checked for each answer.
REJECT_REASONS = ("prompt_too_long", "length", "reasoning_only", "empty")

OutcomeKind = Literal["kept", "rejected", "failed"]


@dataclass(frozen=True)
class RecordOutcome:
    """The result for one record: the regenerated record, or the original with a reject reason or an error."""

    kind: OutcomeKind
    record_id: str
    record: dict[str, Any]
    reason: str = ""
    detail: str = ""
    requests: int = 0

    def reject_entry(self) -> dict[str, Any]:
        return {"reason": self.reason, "id": self.record_id, "detail": self.detail, "record": self.record}

    def failure_entry(self) -> dict[str, Any]:
        return {"id": self.record_id, "error": self.detail, "record": self.record}


@dataclass
class RunCounts:
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    requests: int = 0

    def add(self, outcome: RecordOutcome) -> None:
        self.requests += outcome.requests
        if outcome.kind == "kept":
            self.kept += 1
        elif outcome.kind == "failed":
            self.failed += 1
        else:
            self.rejected[outcome.reason] = self.rejected.get(outcome.reason, 0) + 1


def split_thinking(content: str | None, reasoning: str | None) -> tuple[str, str | None]:
    """Return ``(answer, reasoning)`` from a chat result, taking a think block out of the content if present.

    The content may start with ``<think>`` or not (some templates put it in the generation prompt).
    Returned reasoning has no leading or trailing newlines and is None when there is none.
    """
    answer = content or ""
    if reasoning is None and THINK_CLOSE in answer:
        reasoning, _, answer = answer.partition(THINK_CLOSE)
        reasoning = reasoning.strip()
        if reasoning.startswith(THINK_OPEN):
            reasoning = reasoning[len(THINK_OPEN) :]
    if reasoning is None:
        return answer, None
    return answer.lstrip("\n"), reasoning.strip("\n") or None


def assistant_message(answer: str, reasoning: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if reasoning:
        message[REASONING_KEY] = reasoning
    return message


def request_seed(seed: int, record_id: str, turn: int) -> int:
    """Derive a per-request sampling seed, so a retried or resumed request samples the same way."""
    digest = hashlib.sha256(f"{seed}:{record_id}:{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampling_settings(settings: RegenConfig) -> dict[str, Any]:
    """Return the sampling parameters sent with every request (the seed is derived per request)."""
    return {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        # -1 disables top-k on vLLM and SGLang alike.
        "top_k": settings.top_k if settings.top_k > 0 else -1,
        "min_p": settings.min_p,
        "max_tokens": settings.max_new_tokens,
        "enable_thinking": settings.enable_thinking,
        "seed": settings.seed,
    }


def client_settings(settings: RegenConfig, model: str, api_key: str | None) -> ClientSettings:
    remote = settings.openai
    return ClientSettings(
        endpoints=tuple(Endpoint(url, api_key=api_key) for url in remote.endpoints),
        model=model,
        max_in_flight_per_endpoint=remote.max_in_flight_per_endpoint,
        connect_timeout_s=remote.connect_timeout_s,
        read_timeout_s=remote.read_timeout_s,
        ready_timeout_s=remote.ready_timeout_s,
        max_retries=remote.max_retries,
        backoff_base_s=remote.backoff_base_s,
        backoff_max_s=remote.backoff_max_s,
        max_consecutive_failures=remote.max_consecutive_failures,
    )


class RecordRegenerator:
    """Regenerate the assistant turns of one record at a time through a chat client."""

    def __init__(
        self, client: OpenAIChatClient, tokenizer: Any, settings: RegenConfig, sampling: dict[str, Any]
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.settings = settings
        self.sampling = sampling

    async def regenerate(self, record: dict[str, Any]) -> RecordOutcome:
        record_id = str(record["id"])
        settings = self.settings
        conversation: list[dict[str, Any]] = []
        requests = 0
        for message in record["messages"]:
            role = message["role"]
            if role == "system":
                conversation.append({"role": "system", "content": message["content"]})
                continue
            if role == "assistant":
                continue
            turn = requests
            conversation.append({"role": "user", "content": message["content"]})
            prompt_length = len(
                render_prompt_ids(
                    self.tokenizer,
                    conversation,
                    system_prompt_policy=settings.system_prompt_policy,
                    enable_thinking=bool(settings.enable_thinking),
                )
            )
            if prompt_length > settings.max_prompt_tokens:
                detail = f"turn {turn}: {prompt_length} > regen.max_prompt_tokens={settings.max_prompt_tokens} tokens"
                return RecordOutcome("rejected", record_id, record, "prompt_too_long", detail, requests)
            requests += 1
            try:
                result = await self.client.chat(self._request_messages(conversation), self._params(record_id, turn))
            except RequestFailed as error:
                detail = f"turn {turn}: status {error.status} after {error.attempts} attempts: {error.reason}"
                return RecordOutcome("failed", record_id, record, "request_failed", detail, requests)
            answer, reasoning = split_thinking(result.content, result.reasoning)
            rejection = self._check(result, answer, reasoning)
            if rejection is not None:
                detail = f"turn {turn}: {_describe(result)}"
                return RecordOutcome("rejected", record_id, record, rejection, detail, requests)
            conversation.append(assistant_message(answer, reasoning))
        return RecordOutcome("kept", record_id, {**record, "messages": conversation}, requests=requests)

    def _check(self, result: ChatResult, answer: str, reasoning: str | None) -> str | None:
        if result.finish_reason == "length" and not self.settings.keep_truncated:
            return "length"
        if not answer.strip():
            return "reasoning_only" if reasoning else "empty"
        return None

    def _request_messages(self, conversation: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        # The server renders the template itself, so system turns follow the same policy here as everywhere.
        plain = [{"role": m["role"], "content": m["content"]} for m in conversation]
        return apply_system_prompt_policy(self.tokenizer, plain, self.settings.system_prompt_policy)

    def _params(self, record_id: str, turn: int) -> SamplingParams:
        values = dict(self.sampling)
        values["seed"] = request_seed(values["seed"], record_id, turn)
        return SamplingParams(**values)


def _describe(result: ChatResult) -> str:
    content = result.content or ""
    return (
        f"finish_reason={result.finish_reason}, {result.completion_tokens} completion tokens, "
        f"content {content[:60]!r}, reasoning {len(result.reasoning or '')} chars"
    )


async def regenerate_records(
    records: Iterable[dict[str, Any]],
    settings: ClientSettings,
    regen: RegenConfig,
    tokenizer: Any,
    on_outcome: Callable[[RecordOutcome], None],
) -> RunCounts:
    """Regenerate ``records`` concurrently and hand each finished record to ``on_outcome`` as it completes.

    Raises :class:`RegenAborted` (after the records already handed over) when the client gives up on the
    servers; rerunning resumes from the records not handed over.
    """
    counts = RunCounts()
    pending = iter(records)
    workers = max(1, settings.max_in_flight_per_endpoint * len(settings.endpoints))
    async with OpenAIChatClient(settings) as client:
        await client.wait_ready()
        regenerator = RecordRegenerator(client, tokenizer, regen, sampling_settings(regen))

        async def work() -> None:
            for record in pending:
                outcome = await regenerator.regenerate(record)
                counts.add(outcome)
                on_outcome(outcome)

        tasks = [asyncio.create_task(work()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        logger.info("client statistics: %s", client.stats())
    return counts


__all__ = [
    "REJECT_REASONS",
    "RecordOutcome",
    "RecordRegenerator",
    "RegenAborted",
    "RunCounts",
    "assistant_message",
    "client_settings",
    "regenerate_records",
    "request_seed",
    "sampling_settings",
    "split_thinking",
]

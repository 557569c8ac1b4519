"""Asynchronous client for OpenAI-compatible chat-completions servers (vLLM, SGLang) that regenerates answers.

Usage::

    settings = ClientSettings(endpoints=(Endpoint("http://127.0.0.1:8000/v1"),), model="Qwen/Qwen3-4B")
    async with OpenAIChatClient(settings) as client:
        await client.wait_ready()
        result = await client.chat(messages, SamplingParams(0.7, 0.8, 20, 0.0, 4096, enable_thinking=False))

Each request is a non-streaming ``POST {base_url}/chat/completions``. Requests go to the healthy endpoint
with the fewest requests in flight, at most ``max_in_flight_per_endpoint`` per endpoint. Connection
errors, timeouts, 429 and 5xx are retried with exponential backoff and full jitter, honouring
``Retry-After``; any other 4xx raises ``RequestFailed`` at once. An endpoint that fails
``unhealthy_after_failures`` attempts in a row gets no requests until a ``GET {base_url}/models`` probe
succeeds again after ``unhealthy_cooldown_s``. ``RegenAborted`` ends the run when
``max_consecutive_failures`` requests fail in a row or when no endpoint is ready for ``ready_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from deepspec.regen.endpoints import (
    EndpointPool,
    EndpointState,
    ThrottledLog,
    backoff_delay,
    parse_retry_after,
)

logger = logging.getLogger(__name__)

_ERROR_TEXT_LIMIT = 500


@dataclass(frozen=True)
class Endpoint:
    """One server's OpenAI-compatible base URL (ending in ``/v1``) and its optional API key."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"endpoint base_url={self.base_url!r} is invalid: it must start with http:// or https://, "
                "e.g. http://127.0.0.1:8000/v1"
            )
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))


@dataclass(frozen=True)
class ClientSettings:
    """Endpoints, model name, concurrency, timeouts and retry policy of an ``OpenAIChatClient``."""

    endpoints: tuple[Endpoint, ...]
    model: str
    max_in_flight_per_endpoint: int = 64
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0
    ready_timeout_s: float = 900.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_consecutive_failures: int = 50
    unhealthy_after_failures: int = 3
    unhealthy_cooldown_s: float = 30.0
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("endpoints=() is empty: give at least one Endpoint('http://HOST:PORT/v1')")
        urls = [endpoint.base_url for endpoint in self.endpoints]
        if len(set(urls)) != len(urls):
            raise ValueError(f"endpoints={urls} lists a base_url twice: give each server once")
        if not self.model:
            raise ValueError("model='' is empty: set it to the model name the servers serve (GET /v1/models)")
        for name in ("max_in_flight_per_endpoint", "max_consecutive_failures", "unhealthy_after_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be at least 1")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries!r} is invalid: it must be 0 or more")
        for name in (
            "connect_timeout_s",
            "read_timeout_s",
            "ready_timeout_s",
            "backoff_max_s",
            "unhealthy_cooldown_s",
            "probe_interval_s",
            "probe_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: it must be a positive number of seconds")
        if self.backoff_base_s < 0:
            raise ValueError(f"backoff_base_s={self.backoff_base_s!r} is invalid: it must be 0 or more seconds")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent with every request. ``top_k=-1`` disables top-k sampling."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    max_tokens: int
    enable_thinking: bool | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: it must be 0 or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: it must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} is invalid: use -1 to disable top-k, else a positive count")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} is invalid: it must be in [0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: it must be at least 1")


@dataclass(frozen=True)
class ChatResult:
    """A completed chat reply. ``reasoning`` is the separate thinking text, None when the server sends none."""

    content: str
    reasoning: str | None
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    endpoint: str
    attempts: int


class RequestFailed(Exception):
    """One request failed for good: a 4xx other than 429, an invalid response, or retries used up."""

    def __init__(self, status: int | None, reason: str, attempts: int, endpoint: str | None = None) -> None:
        where = f" on {endpoint}" if endpoint else ""
        http = f"HTTP {status}: " if status is not None else ""
        super().__init__(f"request failed after {attempts} attempt(s){where}: {http}{reason}")
        self.status = status
        self.reason = reason
        self.attempts = attempts
        self.endpoint = endpoint


class RegenAborted(Exception):
    """The run cannot continue: no endpoint is ready, or too many requests failed in a row."""


class _AttemptFailed(Exception):
    """Failure of one attempt. ``endpoint_fault`` counts it against the endpoint's health."""

    def __init__(
        self, status: int | None, reason: str, retryable: bool, endpoint_fault: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable
        self.endpoint_fault = endpoint_fault
        self.retry_after_s = retry_after_s


class OpenAIChatClient:
    """Client that sends chat-completion requests to OpenAI-compatible endpoints, used as an async context manager."""

    def __init__(self, settings: ClientSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self._states = [EndpointState(e.base_url, _headers(e.api_key)) for e in settings.endpoints]
        self._pool = EndpointPool(self._states, settings.max_in_flight_per_endpoint)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._healthy_event = asyncio.Event()
        self._abort_event = asyncio.Event()
        self._aborted: RegenAborted | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._all_down_since = time.monotonic()
        self._consecutive_failures = 0
        self._recent_errors: collections.deque[str] = collections.deque(maxlen=5)
        self._warnings = ThrottledLog(logger)

    async def __aenter__(self) -> OpenAIChatClient:
        # The pool is unbounded because the endpoint pool already limits requests in flight.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        tasks = list(self._probes.values())
        if self._ready_task is not None:
            tasks.append(self._ready_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_ready(self) -> None:
        """Probe ``GET /models`` on every endpoint until one returns 200; raise ``RegenAborted`` at the deadline.

        Endpoints that are not ready yet keep being probed in the background and receive requests once ready.
        """
        self._require_session()
        if self._aborted is not None:
            raise self._aborted
        if self._healthy_event.is_set():
            return
        self._all_down_since = time.monotonic()
        logger.info(
            "waiting up to %.0f s for %d endpoint(s) to respond to GET /models: %s",
            self.settings.ready_timeout_s,
            len(self._states),
            ", ".join(state.base_url for state in self._states),
        )
        for state in self._states:
            self._start_probe(state, first_delay_s=0.0)
        ready = asyncio.ensure_future(self._healthy_event.wait())
        aborted = asyncio.ensure_future(self._abort_event.wait())
        try:
            await asyncio.wait(
                {ready, aborted}, timeout=self.settings.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            aborted.cancel()
        if self._healthy_event.is_set():
            waiting = [state.base_url for state in self._states if not state.healthy]
            if waiting:
                logger.info("endpoints not ready yet, still probing: %s", ", ".join(waiting))
            return
        if self._aborted is None:
            self._abort(self._not_ready_message())
        assert self._aborted is not None
        raise self._aborted

    async def chat(self, messages: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        """Send ``messages`` and return the reply.

        Raises ``RequestFailed`` when this request fails for good and ``RegenAborted`` when the run must stop.
        """
        await self._ensure_ready()
        data = json.dumps(self._request_body(messages, params)).encode()
        attempt = 0
        avoid: EndpointState | None = None
        while True:
            attempt += 1
            state = await self._pool.acquire(avoid)
            started = time.monotonic()
            try:
                result = await self._send(state, data, attempt)
            except _AttemptFailed as failure:
                self._pool.release(state)
                state.failed += 1
                state.last_error = _describe(failure)
                if failure.endpoint_fault:
                    self._record_endpoint_failure(state, state.last_error)
                if not failure.retryable or attempt > self.settings.max_retries:
                    raise self._request_failed(failure, attempt, state.base_url) from None
                state.retried += 1
                delay = backoff_delay(attempt - 1, self.settings.backoff_base_s, self.settings.backoff_max_s, self._rng)
                if failure.retry_after_s is not None:
                    # NOTE: a Retry-After longer than backoff_max_s is cut to backoff_max_s.
                    delay = min(failure.retry_after_s, self.settings.backoff_max_s)
                self._warnings.log(
                    logging.WARNING,
                    f"retry {state.base_url}",
                    "%s: %s; retrying in %.1fs (attempt %d of %d)",
                    state.base_url,
                    _describe(failure),
                    delay,
                    attempt + 1,
                    self.settings.max_retries + 1,
                )
                await self._sleep_unless_aborted(delay)
                avoid = state
                continue
            except BaseException:
                self._pool.release(state)
                raise
            self._pool.release(state)
            state.record_ok(time.monotonic() - started)
            self._consecutive_failures = 0
            return result

    def stats(self) -> dict[str, dict[str, Any]]:
        """Return counters per endpoint base URL: ok, failed (attempts), retried, in_flight, healthy, mean latency."""
        return {state.base_url: state.stats() for state in self._states}

    def _request_body(self, messages: list[dict[str, str]], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "min_p": params.min_p,
            "max_tokens": params.max_tokens,
            "n": 1,
        }
        if params.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": params.enable_thinking}
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def _send(self, state: EndpointState, data: bytes, attempt: int) -> ChatResult:
        session = self._require_session()
        try:
            async with session.post(
                state.completions_url, data=data, headers=state.headers, timeout=self._timeout
            ) as response:
                status = response.status
                raw = await response.read()
                retry_header = response.headers.get("Retry-After") if status != 200 else None
        except asyncio.TimeoutError as error:
            if isinstance(error, getattr(aiohttp, "ConnectionTimeoutError", ())):
                reason = f"connection timed out after connect_timeout_s={self.settings.connect_timeout_s}"
            else:
                reason = f"no response within read_timeout_s={self.settings.read_timeout_s}"
            raise _AttemptFailed(None, reason, retryable=True, endpoint_fault=True) from None
        except aiohttp.ClientError as error:
            reason = f"{type(error).__name__}: {error}"
            raise _AttemptFailed(None, reason, retryable=True, endpoint_fault=True) from None
        if status != 200:
            message = _error_message(raw)
            retry_after = parse_retry_after(retry_header)
            if status == 429:
                raise _AttemptFailed(status, message, True, endpoint_fault=False, retry_after_s=retry_after)
            if status >= 500:
                raise _AttemptFailed(status, message, True, endpoint_fault=True, retry_after_s=retry_after)
            raise _AttemptFailed(status, message, retryable=False, endpoint_fault=False)
        try:
            payload = json.loads(raw)
        except ValueError:
            reason = f"response is not valid JSON: {_clip(raw.decode(errors='replace'))!r}"
            raise _AttemptFailed(status, reason, retryable=True, endpoint_fault=True) from None
        return _parse_completion(payload, state.base_url, attempt)

    async def _ensure_ready(self) -> None:
        if self._aborted is not None:
            raise self._aborted
        if self._healthy_event.is_set():
            return
        if self._ready_task is None:
            self._ready_task = asyncio.ensure_future(self.wait_ready())
        await asyncio.shield(self._ready_task)

    def _start_probe(self, state: EndpointState, first_delay_s: float, restart: bool = False) -> None:
        running = self._probes.get(state.base_url)
        if running is not None and not running.done():
            if not restart:
                return
            running.cancel()
        self._probes[state.base_url] = asyncio.ensure_future(self._probe_until_healthy(state, first_delay_s))

    async def _probe_until_healthy(self, state: EndpointState, first_delay_s: float) -> None:
        try:
            await self._sleep_unless_aborted(first_delay_s)
            while True:
                error = await self._probe(state)
                if error is None:
                    state.healthy = True
                    state.consecutive_failures = 0
                    self._healthy_event.set()
                    logger.info("endpoint ready: %s", state.base_url)
                    self._pool.wake()
                    return
                state.last_error = error
                if self._pool.healthy_count() == 0 and self._healthy_event.is_set():
                    down_s = time.monotonic() - self._all_down_since
                    if down_s >= self.settings.ready_timeout_s:
                        self._abort(self._not_ready_message())
                        return
                await self._sleep_unless_aborted(self.settings.probe_interval_s)
        except RegenAborted:
            return

    async def _probe(self, state: EndpointState) -> str | None:
        """Return None when ``GET /models`` returns 200, else a description of the error."""
        session = self._require_session()
        timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
        try:
            async with session.get(f"{state.base_url}/models", headers=state.headers, timeout=timeout) as response:
                raw = await response.read()
                if response.status != 200:
                    return f"GET /models returned HTTP {response.status}: {_error_message(raw)}"
        except asyncio.TimeoutError:
            return f"GET /models timed out after probe_timeout_s={self.settings.probe_timeout_s}"
        except aiohttp.ClientError as error:
            return f"GET /models failed: {type(error).__name__}: {error}"
        self._check_model_listed(state, raw)
        return None

    def _check_model_listed(self, state: EndpointState, raw: bytes) -> None:
        try:
            listed = [entry["id"] for entry in json.loads(raw)["data"]]
        except (ValueError, KeyError, TypeError):
            return
        if listed and self.settings.model not in listed:
            # Only a warning, because some servers accept any model name in requests.
            logger.warning(
                "%s does not list model %r (it lists %s); requests may fail with 404 until the model name matches",
                state.base_url,
                self.settings.model,
                listed,
            )

    def _record_endpoint_failure(self, state: EndpointState, reason: str) -> None:
        state.consecutive_failures += 1
        if not state.healthy or state.consecutive_failures < self.settings.unhealthy_after_failures:
            return
        state.healthy = False
        if self._pool.healthy_count() > 0:
            logger.warning(
                "endpoint %s marked unhealthy after %d failed attempts in a row (last: %s); probing again in %.1fs",
                state.base_url,
                state.consecutive_failures,
                reason,
                self.settings.unhealthy_cooldown_s,
            )
            self._start_probe(state, first_delay_s=self.settings.unhealthy_cooldown_s)
            return
        # No endpoint is left to take requests, so waiting out the cool-down would only stall the run.
        self._all_down_since = time.monotonic()
        logger.warning(
            "endpoint %s marked unhealthy after %d failed attempts in a row (last: %s); no healthy endpoint is left, "
            "probing all of them every %.1fs for up to ready_timeout_s=%s",
            state.base_url,
            state.consecutive_failures,
            reason,
            self.settings.probe_interval_s,
            self.settings.ready_timeout_s,
        )
        for other in self._states:
            self._start_probe(other, first_delay_s=0.0, restart=True)

    def _request_failed(self, failure: _AttemptFailed, attempts: int, endpoint: str) -> Exception:
        error = RequestFailed(failure.status, failure.reason, attempts, endpoint)
        self._warnings.log(logging.ERROR, f"failed {endpoint}", "%s", str(error))
        self._recent_errors.append(str(error).rstrip("."))
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.settings.max_consecutive_failures:
            self._abort(
                f"regeneration aborted: {self._consecutive_failures} requests failed in a row "
                f"(max_consecutive_failures={self.settings.max_consecutive_failures}). "
                f"Endpoints: {self._endpoint_summary()}. Last errors: {' | '.join(self._recent_errors)}. "
                f"Fix: check that every server is up and serves model {self.settings.model!r} "
                "(GET <base_url>/models lists it), that the request settings suit the server, "
                "and read the server logs."
            )
            assert self._aborted is not None
            return self._aborted
        return error

    def _not_ready_message(self) -> str:
        return (
            f"no endpoint became ready within ready_timeout_s={self.settings.ready_timeout_s}: "
            f"{self._endpoint_summary()}. Fix: start the servers, check that GET <base_url>/models answers "
            "from this machine, or raise ready_timeout_s if loading the model takes longer."
        )

    def _endpoint_summary(self) -> str:
        parts = []
        for state in self._states:
            health = "healthy" if state.healthy else "unhealthy"
            parts.append(f"{state.base_url} ({health}, last error: {state.last_error})")
        return "; ".join(parts)

    def _abort(self, message: str) -> None:
        if self._aborted is not None:
            return
        logger.error("%s", message)
        self._aborted = RegenAborted(message)
        self._abort_event.set()
        self._pool.fail_waiters(self._aborted)

    async def _sleep_unless_aborted(self, delay_s: float) -> None:
        if delay_s > 0 and self._aborted is None:
            try:
                await asyncio.wait_for(self._abort_event.wait(), timeout=delay_s)
            except asyncio.TimeoutError:
                pass
        if self._aborted is not None:
            raise self._aborted

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("OpenAIChatClient is not open: use 'async with OpenAIChatClient(settings) as client'")
        return self._session


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _parse_completion(payload: Any, endpoint: str, attempts: int) -> ChatResult:
    try:
        choice = payload["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        reason = f"response has no choices[0].message: {_clip(json.dumps(payload))}"
        raise _AttemptFailed(200, reason, retryable=False, endpoint_fault=False) from None
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")
    usage = payload.get("usage") or {}
    return ChatResult(
        content=message.get("content") or "",
        reasoning=reasoning,
        finish_reason=choice.get("finish_reason") or "unknown",
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        endpoint=endpoint,
        attempts=attempts,
    )


def _error_message(raw: bytes) -> str:
    """Return the server's error message from an OpenAI-style or vLLM-style error body, else the clipped body."""
    text = raw.decode(errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        return _clip(text) or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return _clip(str(error["message"]))
        if isinstance(error, str):
            return _clip(error)
        if payload.get("message"):
            return _clip(str(payload["message"]))
    return _clip(text)


def _describe(failure: _AttemptFailed) -> str:
    return f"HTTP {failure.status}: {failure.reason}" if failure.status is not None else failure.reason


def _clip(text: str) -> str:
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + "..."

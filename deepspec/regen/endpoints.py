"""Endpoint bookkeeping for the chat client: in-flight slots, health, retry delays and throttled warnings."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from yarl import URL


@dataclass(eq=False)
class EndpointState:
    """Live state of one server: its in-flight count, health and counters."""

    base_url: str
    headers: dict[str, str] = field(repr=False)
    in_flight: int = 0
    healthy: bool = False
    consecutive_failures: int = 0
    ok: int = 0
    failed: int = 0
    retried: int = 0
    latency_total_s: float = 0.0
    last_error: str = "none"
    completions_url: URL = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Parsed once here instead of on every request.
        self.completions_url = URL(f"{self.base_url}/chat/completions")

    def record_ok(self, latency_s: float) -> None:
        self.ok += 1
        self.latency_total_s += latency_s
        self.consecutive_failures = 0

    def stats(self) -> dict[str, Any]:
        mean = self.latency_total_s / self.ok if self.ok else None
        return {
            "ok": self.ok,
            "failed": self.failed,
            "retried": self.retried,
            "in_flight": self.in_flight,
            "healthy": self.healthy,
            "mean_latency_s": mean,
        }


class EndpointPool:
    """Hand out request slots: at most ``max_in_flight`` per endpoint, least in-flight healthy endpoint first.

    Waiters are served in FIFO order whenever a slot frees up or an endpoint turns healthy.
    ``fail_waiters`` wakes every waiter with an exception, which ends a run that cannot continue.
    """

    def __init__(self, states: list[EndpointState], max_in_flight: int) -> None:
        self.states = states
        self.max_in_flight = max_in_flight
        self._waiters: collections.deque[tuple[asyncio.Future[EndpointState], EndpointState | None]] = (
            collections.deque()
        )
        self._next = 0
        self._error: BaseException | None = None

    def healthy_count(self) -> int:
        return sum(1 for state in self.states if state.healthy)

    async def acquire(self, avoid: EndpointState | None = None) -> EndpointState:
        """Return an endpoint with a free slot, counted as in flight, and ``avoid`` only when no other is free."""
        if self._error is not None:
            raise self._error
        if not self._waiters:
            state = self._pick(avoid)
            if state is not None:
                state.in_flight += 1
                return state
        future: asyncio.Future[EndpointState] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, avoid))
        try:
            return await future
        except asyncio.CancelledError:
            # The slot may have been handed over just before the cancellation arrived.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            raise

    def release(self, state: EndpointState) -> None:
        state.in_flight -= 1
        self.wake()

    def wake(self) -> None:
        """Give free slots to waiters in arrival order."""
        while self._waiters:
            future, avoid = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            state = self._pick(avoid)
            if state is None:
                return
            self._waiters.popleft()
            state.in_flight += 1
            future.set_result(state)

    def fail_waiters(self, error: BaseException) -> None:
        """Make every current and later ``acquire`` raise ``error``."""
        self._error = error
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                future.set_exception(error)

    def _pick(self, avoid: EndpointState | None) -> EndpointState | None:
        count = len(self.states)
        best: EndpointState | None = None
        fallback: EndpointState | None = None
        # Start the scan one past the last pick so that ties rotate between endpoints.
        for offset in range(count):
            state = self.states[(self._next + offset) % count]
            if not state.healthy or state.in_flight >= self.max_in_flight:
                continue
            if state is avoid:
                fallback = state
                continue
            if best is None or state.in_flight < best.in_flight:
                best = state
        chosen = best if best is not None else fallback
        if chosen is not None:
            self._next = (self.states.index(chosen) + 1) % count
        return chosen


def backoff_delay(retry_index: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Return a full-jitter delay: uniform in [0, min(max_s, base_s * 2**retry_index)]."""
    ceiling = min(max_s, base_s * (2.0 ** min(retry_index, 62)))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return the delay in seconds that a ``Retry-After`` header requests, or None when missing or invalid.

    The header contains either a number of seconds or an HTTP date.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment is None or moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


class ThrottledLog:
    """Log a message at most once per ``interval_s`` per key and report how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, message, *args)

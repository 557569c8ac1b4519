"""The OpenAI-compatible chat client against scripted local servers: replies, retries, timeouts, health, aborts."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from deepspec.regen.endpoints import EndpointPool, EndpointState, backoff_delay, parse_retry_after
from deepspec.regen.openai_client import (
    ChatResult,
    ClientSettings,
    Endpoint,
    OpenAIChatClient,
    RegenAborted,
    RequestFailed,
    SamplingParams,
)
from tests.openai_server import Behaviour, FakeOpenAIServer, openai_servers_fixture  # noqa: F401

T = TypeVar("T")

# Every scenario ends well before this, so a hang fails the test with TimeoutError instead of blocking.
GUARD_S = 20.0

PARAMS = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0, max_tokens=64)
HELLO = [{"role": "user", "content": "hello there"}]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, GUARD_S))


def fast_settings(*urls: str, **overrides: Any) -> ClientSettings:
    values: dict[str, Any] = {
        "endpoints": tuple(Endpoint(url) for url in urls),
        "model": "fake-model",
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.3,
        "ready_timeout_s": 3.0,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "unhealthy_cooldown_s": 60.0,
        "probe_interval_s": 0.05,
        "probe_timeout_s": 0.3,
    }
    values.update(overrides)
    return ClientSettings(**values)


async def chat_once(settings: ClientSettings, messages: list[dict[str, str]] = HELLO, params=PARAMS) -> ChatResult:
    async with OpenAIChatClient(settings) as client:
        return await client.chat(messages, params)


async def wait_all_healthy(client: OpenAIChatClient) -> None:
    """Wait until every endpoint passed its readiness probe, because ``wait_ready`` returns at the first one."""
    await client.wait_ready()
    while not all(entry["healthy"] for entry in client.stats().values()):
        await asyncio.sleep(0.01)


def unused_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_echo_answer_and_usage():
    with FakeOpenAIServer() as server:
        result = run(chat_once(fast_settings(server.base_url)))
    assert result.content == "echo: hello there"
    assert result.reasoning is None
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == 2
    assert result.completion_tokens == 3
    assert result.endpoint == server.base_url
    assert result.attempts == 1


def test_request_body_as_received():
    params = SamplingParams(0.6, 0.95, 20, 0.05, 128, enable_thinking=False, seed=7)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    with FakeOpenAIServer() as server:
        run(chat_once(fast_settings(server.base_url), messages, params))
        bodies = server.completions()
    assert len(bodies) == 1
    body = bodies[0]
    assert body["model"] == "fake-model"
    assert body["messages"] == messages
    assert body["temperature"] == 0.6
    assert body["top_p"] == 0.95
    assert body["top_k"] == 20
    assert body["min_p"] == 0.05
    assert body["max_tokens"] == 128
    assert body["n"] == 1
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["seed"] == 7


def test_request_body_omits_unset_options():
    with FakeOpenAIServer() as server:
        run(chat_once(fast_settings(server.base_url), params=replace(PARAMS, enable_thinking=True)))
        run(chat_once(fast_settings(server.base_url)))
        thinking, plain = server.completions()
    assert thinking["chat_template_kwargs"] == {"enable_thinking": True}
    assert "seed" not in thinking
    assert "chat_template_kwargs" not in plain
    assert "seed" not in plain


def test_api_key_sent_but_never_shown(caplog):
    key = "sk-do-not-print-4242"
    with FakeOpenAIServer(Behaviour(fail_first=10**6, fail_status=500)) as server:
        settings = replace(fast_settings(server.base_url, max_retries=1), endpoints=(Endpoint(server.base_url, key),))
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(RequestFailed) as failure:
                run(chat_once(settings))
        headers = [request.headers for request in server.requests]
    assert all(h.get("Authorization") == f"Bearer {key}" for h in headers)
    assert key not in repr(settings)
    assert key not in str(failure.value)
    assert key not in caplog.text


def test_finish_reason_length_passed_through():
    with FakeOpenAIServer(Behaviour(finish_reason="length")) as server:
        result = run(chat_once(fast_settings(server.base_url)))
    assert result.finish_reason == "length"
    assert result.content == "echo: hello there"


def test_reply_callback_builds_content():
    def count_messages(body: dict[str, Any]) -> str:
        return f"{len(body['messages'])} messages"

    with FakeOpenAIServer(Behaviour(reply=count_messages)) as server:
        result = run(
            chat_once(fast_settings(server.base_url), [*HELLO, {"role": "assistant", "content": "hi"}, *HELLO])
        )
    assert result.content == "3 messages"


@pytest.mark.parametrize("field_name", ["reasoning_content", "reasoning"])
def test_reasoning_read_from_either_field(field_name):
    behaviour = Behaviour(reasoning="first think", reasoning_field=field_name)
    with FakeOpenAIServer(behaviour) as server:
        result = run(chat_once(fast_settings(server.base_url)))
    assert result.reasoning == "first think"
    assert result.content == "echo: hello there"


def test_reasoning_only_answer_has_empty_content():
    behaviour = Behaviour(reasoning="thought until the limit", null_content=True, finish_reason="length")
    with FakeOpenAIServer(behaviour) as server:
        result = run(chat_once(fast_settings(server.base_url)))
    assert result.content == ""
    assert result.reasoning == "thought until the limit"
    assert result.finish_reason == "length"


def test_server_error_twice_then_success():
    with FakeOpenAIServer(Behaviour(fail_first=2, fail_status=500)) as server:

        async def scenario() -> tuple[ChatResult, dict[str, Any]]:
            async with OpenAIChatClient(fast_settings(server.base_url)) as client:
                return await client.chat(HELLO, PARAMS), client.stats()

        result, stats = run(scenario())
        received = len(server.completions())
    assert result.attempts == 3
    assert result.content == "echo: hello there"
    assert received == 3
    endpoint_stats = stats[server.base_url]
    assert endpoint_stats["ok"] == 1
    assert endpoint_stats["failed"] == 2
    assert endpoint_stats["retried"] == 2
    assert endpoint_stats["in_flight"] == 0


def test_bad_request_not_retried():
    behaviour = Behaviour(fail_first=10**6, fail_status=400, fail_message="max_tokens is too large for this model")
    with FakeOpenAIServer(behaviour) as server:
        with pytest.raises(RequestFailed) as failure:
            run(chat_once(fast_settings(server.base_url)))
        received = len(server.completions())
    assert received == 1
    assert failure.value.status == 400
    assert failure.value.attempts == 1
    assert "max_tokens is too large for this model" in failure.value.reason
    assert server.base_url in str(failure.value)


def test_retries_exhausted_raise_request_failed():
    with FakeOpenAIServer(Behaviour(fail_first=10**6, fail_status=503)) as server:
        with pytest.raises(RequestFailed) as failure:
            run(chat_once(fast_settings(server.base_url, max_retries=2, unhealthy_after_failures=10)))
        received = len(server.completions())
    assert received == 3
    assert failure.value.status == 503
    assert failure.value.attempts == 3


def test_rate_limit_honours_retry_after(caplog):
    behaviour = Behaviour(fail_first=1, fail_status=429, retry_after="1")
    with FakeOpenAIServer(behaviour) as server:
        with caplog.at_level(logging.WARNING):
            result = run(chat_once(fast_settings(server.base_url, backoff_max_s=5.0)))
        arrivals = [r.arrived for r in server.requests if r.method == "POST"]
    assert result.attempts == 2
    assert "HTTP 429: scripted failure; retrying in 1.0s" in caplog.text
    assert len(arrivals) == 2
    # asyncio.sleep never returns early, so the gap is at least the one second the server asked for.
    assert arrivals[1] - arrivals[0] >= 1.0


def test_parse_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-2") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_backoff_delay_within_jitter_bounds():
    import random

    rng = random.Random(0)
    for retry_index in range(8):
        ceiling = min(60.0, 1.0 * 2**retry_index)
        delays = [backoff_delay(retry_index, 1.0, 60.0, rng) for _ in range(50)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling / 2


def test_stalling_endpoint_alone_aborts_run():
    with FakeOpenAIServer(Behaviour(stall_completions=True)) as server:
        settings = fast_settings(server.base_url, max_retries=1, max_consecutive_failures=2)

        async def scenario() -> list[BaseException]:
            async with OpenAIChatClient(settings) as client:
                await client.wait_ready()
                outcomes = await asyncio.gather(*(client.chat(HELLO, PARAMS) for _ in range(4)), return_exceptions=True)
                return [outcome for outcome in outcomes if isinstance(outcome, BaseException)]

        errors = run(scenario())
    assert len(errors) == 4
    assert all(isinstance(error, (RequestFailed, RegenAborted)) for error in errors)
    aborted = [error for error in errors if isinstance(error, RegenAborted)]
    assert aborted
    assert server.base_url in str(aborted[0])
    assert "read_timeout_s" in str(aborted[0])


def test_stalling_endpoint_skipped_for_healthy_one():
    with FakeOpenAIServer(Behaviour(stall_completions=True)) as stalled, FakeOpenAIServer() as good:
        settings = fast_settings(stalled.base_url, good.base_url, unhealthy_after_failures=2)

        async def scenario() -> tuple[list[ChatResult], dict[str, Any]]:
            async with OpenAIChatClient(settings) as client:
                await wait_all_healthy(client)
                results = [await client.chat(HELLO, PARAMS) for _ in range(6)]
                return results, client.stats()

        results, stats = run(scenario())
        stalled_received = len(stalled.completions())
    assert all(result.endpoint == good.base_url for result in results)
    assert all(result.content == "echo: hello there" for result in results)
    assert stalled_received == 2
    assert stats[stalled.base_url]["healthy"] is False
    assert stats[good.base_url]["ok"] == 6


def test_never_answering_endpoint_alone_times_out_ready():
    with FakeOpenAIServer(Behaviour(never_answer=True)) as server:
        settings = fast_settings(server.base_url, ready_timeout_s=0.8)
        with pytest.raises(RegenAborted) as aborted:
            run(chat_once(settings))
    message = str(aborted.value)
    assert "ready_timeout_s=0.8" in message
    assert server.base_url in message
    assert "timed out" in message


def test_never_answering_endpoint_beside_good_one():
    with FakeOpenAIServer(Behaviour(never_answer=True)) as silent, FakeOpenAIServer() as good:
        settings = fast_settings(silent.base_url, good.base_url)

        async def scenario() -> tuple[list[ChatResult], dict[str, Any]]:
            async with OpenAIChatClient(settings) as client:
                results = await asyncio.gather(*(client.chat(HELLO, PARAMS) for _ in range(5)))
                return list(results), client.stats()

        results, stats = run(scenario())
    assert all(result.endpoint == good.base_url for result in results)
    assert stats[silent.base_url]["healthy"] is False
    assert stats[silent.base_url]["ok"] == 0


def test_server_gone_mid_run_aborts():
    server = FakeOpenAIServer().start()
    settings = fast_settings(server.base_url, ready_timeout_s=0.5, max_retries=10, max_consecutive_failures=100)

    async def scenario() -> tuple[ChatResult, BaseException]:
        async with OpenAIChatClient(settings) as client:
            first = await client.chat(HELLO, PARAMS)
            server.stop()
            with pytest.raises(RegenAborted) as aborted:
                await client.chat(HELLO, PARAMS)
            return first, aborted.value

    first, aborted = run(scenario())
    assert first.content == "echo: hello there"
    message = str(aborted)
    assert "no endpoint became ready within ready_timeout_s=0.5" in message
    assert server.base_url in message
    assert "GET /models failed" in message


def test_wait_ready_deadline_without_server():
    url = unused_port_url()

    async def scenario() -> None:
        async with OpenAIChatClient(fast_settings(url, ready_timeout_s=0.5)) as client:
            await client.wait_ready()

    with pytest.raises(RegenAborted) as aborted:
        run(scenario())
    message = str(aborted.value)
    assert url in message
    assert "GET /models failed" in message
    assert "raise ready_timeout_s" in message


def test_in_flight_bounded_per_endpoint():
    with FakeOpenAIServer(Behaviour(latency_s=0.05)) as server:

        async def scenario() -> list[ChatResult]:
            async with OpenAIChatClient(fast_settings(server.base_url, max_in_flight_per_endpoint=3)) as client:
                return list(await asyncio.gather(*(client.chat(HELLO, PARAMS) for _ in range(12))))

        results = run(scenario())
        peak = server.max_concurrent
    assert len(results) == 12
    assert peak == 3


def test_balanced_across_two_endpoints(openai_servers):
    first, second = openai_servers(Behaviour(latency_s=0.05)), openai_servers(Behaviour(latency_s=0.05))
    settings = fast_settings(first.base_url, second.base_url, max_in_flight_per_endpoint=4)

    async def scenario() -> list[ChatResult]:
        async with OpenAIChatClient(settings) as client:
            await wait_all_healthy(client)
            return list(await asyncio.gather(*(client.chat(HELLO, PARAMS) for _ in range(16))))

    results = run(scenario())
    counts = (len(first.completions()), len(second.completions()))
    peaks = (first.max_concurrent, second.max_concurrent)
    assert len(results) == 16
    assert counts[0] + counts[1] == 16
    assert min(counts) >= 4
    assert peaks == (4, 4)


def test_faster_endpoint_gets_more_requests():
    with FakeOpenAIServer(Behaviour(latency_s=0.15)) as slow, FakeOpenAIServer(Behaviour(latency_s=0.01)) as fast:
        settings = fast_settings(slow.base_url, fast.base_url, read_timeout_s=2.0)

        async def worker(client: OpenAIChatClient) -> None:
            for _ in range(10):
                await client.chat(HELLO, PARAMS)

        async def scenario() -> None:
            async with OpenAIChatClient(settings) as client:
                await wait_all_healthy(client)
                await asyncio.gather(worker(client), worker(client))

        run(scenario())
        slow_count, fast_count = len(slow.completions()), len(fast.completions())
    assert slow_count + fast_count == 20
    assert fast_count > slow_count


def test_unhealthy_endpoint_avoided_then_probed_back():
    with FakeOpenAIServer(Behaviour(fail_first=10**6, fail_status=500)) as broken, FakeOpenAIServer() as good:
        settings = fast_settings(broken.base_url, good.base_url, unhealthy_after_failures=3, unhealthy_cooldown_s=0.3)

        async def scenario() -> tuple[list[ChatResult], dict[str, Any], int, list[ChatResult]]:
            async with OpenAIChatClient(settings) as client:
                await wait_all_healthy(client)
                results = [await client.chat(HELLO, PARAMS) for _ in range(10)]
                stats = client.stats()
                received_while_unhealthy = len(broken.completions())
                broken.behaviour = Behaviour()
                while not client.stats()[broken.base_url]["healthy"]:
                    await asyncio.sleep(0.05)
                later = [await client.chat(HELLO, PARAMS) for _ in range(6)]
                return results, stats, received_while_unhealthy, later

        results, stats, received_while_unhealthy, later = run(scenario())
    assert all(result.endpoint == good.base_url for result in results)
    assert received_while_unhealthy == 3
    assert stats[broken.base_url]["healthy"] is False
    assert stats[broken.base_url]["failed"] == 3
    assert any(result.endpoint == broken.base_url for result in later)


def test_consecutive_failures_abort_run():
    behaviour = Behaviour(fail_first=10**6, fail_status=404, fail_message="The model `fake-model` does not exist.")
    with FakeOpenAIServer(behaviour) as server:

        async def scenario() -> list[BaseException]:
            errors: list[BaseException] = []
            async with OpenAIChatClient(fast_settings(server.base_url, max_consecutive_failures=3)) as client:
                for _ in range(4):
                    try:
                        await client.chat(HELLO, PARAMS)
                    except (RequestFailed, RegenAborted) as error:
                        errors.append(error)
            return errors

        errors = run(scenario())
        received = len(server.completions())
    assert [type(error) for error in errors] == [RequestFailed, RequestFailed, RegenAborted, RegenAborted]
    assert received == 3
    message = str(errors[2])
    assert "3 requests failed in a row" in message
    assert server.base_url in message
    assert "does not exist" in message
    assert "Fix:" in message


def test_success_resets_consecutive_failures():
    with FakeOpenAIServer(Behaviour(fail_first=2, fail_status=400)) as server:

        async def scenario() -> list[str]:
            outcomes = []
            async with OpenAIChatClient(fast_settings(server.base_url, max_consecutive_failures=3)) as client:
                for index in range(5):
                    if index == 3:
                        server.behaviour = Behaviour(fail_first=10**6, fail_status=400)
                    try:
                        await client.chat(HELLO, PARAMS)
                        outcomes.append("ok")
                    except RequestFailed:
                        outcomes.append("failed")
            return outcomes

        outcomes = run(scenario())
    assert outcomes == ["failed", "failed", "ok", "failed", "failed"]


def test_pool_cancelled_waiter_returns_slot():
    async def scenario() -> tuple[int, int]:
        state = EndpointState("http://127.0.0.1:1/v1", {})
        state.healthy = True
        pool = EndpointPool([state], max_in_flight=1)
        holder = await pool.acquire()
        waiting = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        # The release hands the slot to the waiter, which is cancelled before it resumes.
        pool.release(holder)
        in_flight_after_handover = state.in_flight
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return in_flight_after_handover, state.in_flight

    handed_over, after_cancel = run(scenario())
    assert handed_over == 1
    assert after_cancel == 0


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="endpoints"):
        ClientSettings(endpoints=(), model="m")
    with pytest.raises(ValueError, match="base_url='localhost:8000/v1'"):
        Endpoint("localhost:8000/v1")
    with pytest.raises(ValueError, match="max_in_flight_per_endpoint=0"):
        fast_settings("http://127.0.0.1:1/v1", max_in_flight_per_endpoint=0)
    with pytest.raises(ValueError, match="read_timeout_s=0"):
        fast_settings("http://127.0.0.1:1/v1", read_timeout_s=0)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(0.7, 0, 20, 0.0, 10)
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(0.7, 0.8, 20, 0.0, 0)


def test_chat_outside_context_manager_fails():
    client = OpenAIChatClient(fast_settings("http://127.0.0.1:1/v1"))
    with pytest.raises(RuntimeError, match="async with"):
        run(client.chat(HELLO, PARAMS))

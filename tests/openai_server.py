"""A scripted OpenAI-compatible server on 127.0.0.1 for testing and benchmarking the chat client.

API::

    from tests.openai_server import Behaviour, FakeOpenAIServer, FakeOpenAIServerProcess

    with FakeOpenAIServer(Behaviour(latency_s=0.05)) as server:   # serves in a background thread
        server.base_url        # "http://127.0.0.1:<port>/v1", the port is picked by the OS
        server.behaviour       # the Behaviour in use; assign a new one (or change fields) at any time
        server.completions()   # request bodies (dicts) of every POST /chat/completions, in arrival order
        server.requests        # every RecordedRequest: method, path, headers, body, arrival time
        server.max_concurrent  # the most completion requests that were in progress at once

    with FakeOpenAIServerProcess(Behaviour(latency_s=0.2)) as server:   # serves in a child process
        server.base_url        # no recording; for benchmarks, where the server must not share the client's CPU

    from tests.openai_server import openai_servers_fixture   # registers the openai_servers pytest fixture

    def test_two_endpoints(openai_servers):
        slow, broken = openai_servers(Behaviour(latency_s=1.0)), openai_servers(Behaviour(fail_first=10**6))

Routes: ``GET /v1/models`` lists ``Behaviour.model``, and ``POST /v1/chat/completions`` returns one
non-streaming choice. ``Behaviour`` fields script each endpoint:

- ``latency_s``: seconds to sleep before responding to each completion request;
- ``reply``: a callback from the request body to the answer text, by default ``"echo: "`` plus the
  last user message;
- ``finish_reason``: ``"stop"`` or ``"length"`` (any string is sent as given);
- ``reasoning`` and ``reasoning_field``: thinking text, sent as ``message.reasoning_content`` or
  ``message.reasoning``;
- ``null_content``: send ``content: null``, as servers do when the answer is all reasoning;
- ``never_answer``: every route accepts the request and never responds;
- ``stall_completions``: ``/v1/models`` answers, chat completions never respond;
- ``fail_first``, ``fail_status``, ``fail_message`` and ``retry_after``: answer the first
  ``fail_first`` completion requests with ``fail_status`` (500, 400, 429, ...), an OpenAI-style error
  body and, when set, a ``Retry-After`` header. Use a large ``fail_first`` to fail every request.

Usage counts are whitespace-separated words, not tokens.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import pytest
from aiohttp import web

ReplyFunction = Callable[[dict[str, Any]], str]


def echo_reply(body: dict[str, Any]) -> str:
    users = [message["content"] for message in body.get("messages", []) if message.get("role") == "user"]
    return "echo: " + (users[-1] if users else "")


@dataclass
class Behaviour:
    """Scripted responses of one fake endpoint, described field by field in the module docstring."""

    latency_s: float = 0.0
    reply: ReplyFunction = echo_reply
    finish_reason: str = "stop"
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"
    null_content: bool = False
    never_answer: bool = False
    stall_completions: bool = False
    fail_first: int = 0
    fail_status: int = 500
    fail_message: str = "scripted failure"
    retry_after: str | None = None
    model: str = "fake-model"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    arrived: float = field(default_factory=time.monotonic)


class _Handlers:
    """The aiohttp routes, run inside the server's event loop."""

    def __init__(self, behaviour: Behaviour, record: bool) -> None:
        self.behaviour = behaviour
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.completion_count = 0
        self.in_progress = 0
        self.max_concurrent = 0
        self.stop_event = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        behaviour = self.behaviour
        if self.record:
            self.requests.append(RecordedRequest("GET", request.path, dict(request.headers), None))
        if behaviour.never_answer:
            await self.stop_event.wait()
        return web.json_response({"object": "list", "data": [{"id": behaviour.model, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        behaviour = self.behaviour
        if self.record:
            self.requests.append(RecordedRequest("POST", request.path, dict(request.headers), body))
        self.completion_count += 1
        number = self.completion_count
        self.in_progress += 1
        self.max_concurrent = max(self.max_concurrent, self.in_progress)
        try:
            if behaviour.never_answer or behaviour.stall_completions:
                await self.stop_event.wait()
            if behaviour.latency_s > 0:
                await asyncio.sleep(behaviour.latency_s)
        finally:
            self.in_progress -= 1
        if number <= behaviour.fail_first:
            headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else None
            error = {"error": {"message": behaviour.fail_message, "type": "error", "code": behaviour.fail_status}}
            return web.json_response(error, status=behaviour.fail_status, headers=headers)
        return web.json_response(self._answer(behaviour, body, number))

    def _answer(self, behaviour: Behaviour, body: dict[str, Any], number: int) -> dict[str, Any]:
        content = behaviour.reply(body)
        message: dict[str, Any] = {"role": "assistant", "content": None if behaviour.null_content else content}
        if behaviour.reasoning is not None:
            message[behaviour.reasoning_field] = behaviour.reasoning
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_words = len(content.split()) + len((behaviour.reasoning or "").split())
        return {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": behaviour.finish_reason}],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion_words,
                "total_tokens": prompt_words + completion_words,
            },
        }


async def _start_site(handlers: _Handlers) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(handlers.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


class FakeOpenAIServer:
    """One scripted endpoint served from an event loop in a background thread."""

    def __init__(self, behaviour: Behaviour | None = None, *, record: bool = True) -> None:
        self._initial = behaviour or Behaviour()
        self._record = record
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handlers: _Handlers | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def behaviour(self) -> Behaviour:
        return self._require_handlers().behaviour

    @behaviour.setter
    def behaviour(self, value: Behaviour) -> None:
        self._require_handlers().behaviour = value

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._require_handlers().requests)

    @property
    def max_concurrent(self) -> int:
        return self._require_handlers().max_concurrent

    def completions(self) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.path.endswith("/chat/completions") and r.body is not None]

    def start(self) -> FakeOpenAIServer:
        started = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._handlers = _Handlers(self._initial, self._record)
                self._runner, self.port = loop.run_until_complete(_start_site(self._handlers))
            except BaseException as error:  # reported to the starting thread
                errors.append(error)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai-server", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise RuntimeError("fake OpenAI server failed to start") from errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        handlers = self._require_handlers()

        def release_and_stop() -> None:
            # Stalled handlers return once the event is set, so the runner can close their connections.
            handlers.stop_event.set()
            assert self._loop is not None
            self._loop.call_later(0.05, self._loop.stop)

        self._loop.call_soon_threadsafe(release_and_stop)
        self._thread.join(timeout=10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _require_handlers(self) -> _Handlers:
        if self._handlers is None:
            raise RuntimeError("the fake server is not started: use 'with FakeOpenAIServer(...) as server'")
        return self._handlers


def _serve_in_process(behaviour: Behaviour, connection: Connection) -> None:
    async def main() -> None:
        handlers = _Handlers(behaviour, record=False)
        runner, port = await _start_site(handlers)
        connection.send(port)
        # The parent closes its end of the pipe (or dies) to stop the server.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _wait_for_close, connection)
        handlers.stop_event.set()
        await runner.cleanup()

    asyncio.run(main())


def _wait_for_close(connection: Connection) -> None:
    try:
        connection.recv()
    except EOFError:
        pass


class FakeOpenAIServerProcess:
    """One scripted endpoint served from a child process; ``behaviour.reply`` must be a module-level function."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.port = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServerProcess:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve_in_process, args=(self.behaviour, child), daemon=True)
        self._process.start()
        child.close()
        self._connection = parent
        try:
            if not parent.poll(60):
                raise RuntimeError("fake OpenAI server process did not report its port within 60 s")
            self.port = parent.recv()
        except EOFError:
            self.stop()
            raise RuntimeError("fake OpenAI server process exited before reporting its port") from None
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5)
            self._process = None

    def __enter__(self) -> FakeOpenAIServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(name="openai_servers")
def openai_servers_fixture() -> Iterator[Callable[..., FakeOpenAIServer]]:
    """Yield a factory that starts a ``FakeOpenAIServer`` per call; every server stops after the test."""
    started: list[FakeOpenAIServer] = []

    def start(behaviour: Behaviour | None = None, *, record: bool = True) -> FakeOpenAIServer:
        server = FakeOpenAIServer(behaviour, record=record).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()

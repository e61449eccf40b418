"""The Proxy in-process, every step driven by the test: the races of the data path, forced.

The client is hand-driven ASGI (``receive``/``send``); the upstream is an in-process
HTTP/1.1 server on an ephemeral port that answers only when the test tells it to (a head,
a chunk, the end, or an abrupt death); the coordinator is a fake with the one thing the
proxy uses, the ``lease()`` async context manager, which can hold a lease back. Races are
forced through events: nothing here waits by sleeping. Socket-level hardening (limits,
hostile input, timeouts through uvicorn) is in test_proxy_hardening.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from core.common.asgi import Message
from core.config.load import config_from_dict
from model_orchestrator.proxy import Proxy
from model_orchestrator.refusals import Reason, Refused
from model_orchestrator.routing import ModelIndex

pytestmark = pytest.mark.integration

KEEP_ALIVE = 0.05  # seconds between loading comments to a waiting stream
PATIENCE = 10  # seconds: bounds a hang when the code under test is broken; never waited on when it works
SSE = "text/event-stream"


# --- the upstream ----------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the upstream received, answered step by step by the test."""

    path: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    over: asyncio.Event = field(default_factory=asyncio.Event)

    async def head(self, content_type: str, length: int | None = None) -> None:
        framing = "transfer-encoding: chunked" if length is None else f"content-length: {length}"
        await self._write(f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n{framing}\r\n\r\n".encode())

    async def chunk(self, data: bytes) -> None:
        await self._write(b"%x\r\n%s\r\n" % (len(data), data))

    async def raw(self, data: bytes) -> None:
        await self._write(data)

    async def end(self) -> None:
        await self._write(b"0\r\n\r\n")
        self.over.set()

    def die(self) -> None:
        """Gone mid-answer, as a crashed service is: the connection reset, no proper end."""
        self.writer.transport.abort()
        self.over.set()

    async def closed_by_proxy(self) -> bool:
        """True once the proxy has closed this connection (it cancelled the request)."""
        return await asyncio.wait_for(self.reader.read(), PATIENCE) == b""

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class Upstream:
    """Accepts requests (keep-alive) and hands each to the test as an ``Exchange``."""

    def __init__(self) -> None:
        self.exchanges: asyncio.Queue[Exchange] = asyncio.Queue()
        self.port = 0

    async def next(self) -> Exchange:
        return await asyncio.wait_for(self.exchanges.get(), PATIENCE)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Upstream]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")),
                              0)
                await reader.readexactly(length)
                exchange = Exchange(lines[0].split(" ")[1], reader, writer)
                self.exchanges.put_nowait(exchange)
                await exchange.over.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --- the coordinator and the service it leases ---------------------------------------------------------


@dataclass
class StandInService:
    service_token: str = "service-token"
    timed_out: int = 0

    def upstream_timed_out(self) -> None:
        self.timed_out += 1

    def upstream_answered(self) -> None:
        pass


class FakeCoordinator:
    """``acquire()``/``release()`` as the proxy uses them. ``hold`` keeps every admission
    waiting (a model still loading); ``refusal`` is raised instead of a lease."""

    def __init__(self) -> None:
        self.svc = StandInService()
        self.hold: asyncio.Event | None = None
        self.refusal: Refused | None = None
        self.waiting = asyncio.Event()
        self.cancelled_waits = 0
        self.active = 0
        self.released = 0

    def servable_now(self, name: str) -> bool:
        return self.hold is None and self.refusal is None

    async def acquire(self, name: str, ticket: Any = None) -> StandInService:
        if self.refusal is not None:
            raise self.refusal
        if self.hold is not None:
            self.waiting.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled_waits += 1
                raise
            if self.refusal is not None:  # the start it waited for failed
                raise self.refusal
        self.active += 1
        return self.svc

    def release(self, svc: StandInService) -> None:
        self.active -= 1
        self.released += 1


# --- the client ------------------------------------------------------------------------------------------


class Client:
    """A hand-driven ASGI client: its request body, then whatever the test says."""

    def __init__(self, body: bytes) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
        self.sent: list[Message] = []
        self.bodies: asyncio.Queue[bytes] = asyncio.Queue()
        self.watched = asyncio.Event()  # receive() was called after the body: a disconnect watch
        self.on_complete: Callable[[], None] = lambda: None

    async def receive(self) -> Message:
        if self.inbox.empty():
            self.watched.set()
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.bodies.put_nowait(message["body"])
            if not message.get("more_body", False):
                self.on_complete()

    def leave(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})

    async def next_body(self) -> bytes:
        return await asyncio.wait_for(self.bodies.get(), PATIENCE)

    def completed(self) -> bool:
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent)

    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])


@dataclass
class Harness:
    upstream: Upstream
    coordinator: FakeCoordinator
    proxy: Proxy

    def request(self, client: Client) -> asyncio.Task[None]:
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        return asyncio.create_task(self.proxy.openai_route(scope, client.receive, client.send))

    async def streaming(self) -> tuple[Client, asyncio.Task[None], Exchange]:
        """A streamed chat under way: the upstream's first event has reached the client (before
        the upstream sent anything more); the exchange is the test's to go on with."""
        client = Client(chat())
        task = self.request(client)
        exchange = await self.upstream.next()
        await exchange.head(SSE)
        await exchange.chunk(b"data: 1\n\n")
        assert await client.next_body() == b"data: 1\n\n"
        return client, task, exchange


def chat() -> bytes:
    return json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()


def run(scenario: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        async with Upstream().serving() as upstream:
            config = config_from_dict({"models": {"m": {"type": "text", "command": "unused", "port": upstream.port,
                                                        "request_timeout": 30}}}, Path("models.yaml"))
            coordinator = FakeCoordinator()
            proxy = Proxy(cast(Any, coordinator), ModelIndex(config), keep_alive=KEEP_ALIVE)
            try:
                await scenario(Harness(upstream, coordinator, proxy))
            finally:
                await proxy.close()

    asyncio.run(main())


async def finished(task: asyncio.Task[None]) -> None:
    await asyncio.wait_for(task, PATIENCE)


# --- the tests -------------------------------------------------------------------------------------------


def test_events_are_relayed_as_they_arrive_and_the_lease_released() -> None:
    async def scenario(h: Harness) -> None:
        client, task, exchange = await h.streaming()  # its first event relayed before the upstream sent more
        await exchange.chunk(b"data: 2\n\n")
        await exchange.end()
        await finished(task)
        assert client.sent[0]["status"] == 200 and client.headers()[b"x-accel-buffering"] == b"no"
        assert [m["body"] for m in client.sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
        assert client.completed() and (h.coordinator.active, h.coordinator.released) == (0, 1)

    run(scenario)


def test_a_client_that_leaves_while_waiting_for_its_lease_stops_waiting() -> None:
    async def scenario(h: Harness) -> None:
        h.coordinator.hold = asyncio.Event()  # never set: the model never becomes servable
        client = Client(chat())
        task = h.request(client)
        await h.coordinator.waiting.wait()
        client.leave()
        await finished(task)
        assert h.coordinator.cancelled_waits == 1
        assert client.sent == [], "nobody to answer"
        assert h.upstream.exchanges.empty()

    run(scenario)


def test_a_client_that_leaves_mid_stream_cancels_the_upstream_request(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(h: Harness) -> None:
        client, task, exchange = await h.streaming()
        client.leave()
        await finished(task)
        assert await exchange.closed_by_proxy()
        exchange.over.set()
        assert (h.coordinator.active, h.coordinator.released) == (0, 1)
        assert not client.completed()

    caplog.set_level("INFO", "model_orchestrator.proxy")
    run(scenario)
    assert "m: client disconnected; upstream request cancelled" in caplog.text


def test_an_upstream_that_dies_mid_stream_ends_an_event_stream_with_an_error_event() -> None:
    async def scenario(h: Harness) -> None:
        client, task, exchange = await h.streaming()
        exchange.die()
        await finished(task)
        error_event = client.sent[2]["body"]
        assert error_event.startswith(b"data: ") and error_event.endswith(b"\n\n")
        error = json.loads(error_event[6:])["error"]
        assert error["code"] == "upstream_error" and "'m' broke off the response" in error["message"]
        assert client.completed() and client.sent[-1]["body"] == b""
        assert (h.coordinator.active, h.coordinator.released, h.coordinator.svc.timed_out) == (0, 1, 0)

    run(scenario)


def test_an_upstream_that_dies_mid_body_aborts_a_plain_response() -> None:
    async def scenario(h: Harness) -> None:
        client = Client(chat())
        task = h.request(client)
        exchange = await h.upstream.next()
        await exchange.head("application/json", length=100)
        await exchange.raw(b'{"partial"')
        assert await client.next_body() == b'{"partial"'
        exchange.die()
        with pytest.raises(ConnectionAbortedError):  # the server then breaks the client's connection
            await finished(task)
        assert not client.completed(), "a truncated body must not look complete"
        assert (h.coordinator.active, h.coordinator.released) == (0, 1)

    run(scenario)


def test_a_disconnect_as_the_response_completes_cancels_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn hands the watcher ``http.disconnect`` as soon as a response is complete. The
    release that follows must run to its end, and nothing be reported as a disconnect."""

    async def scenario(h: Harness) -> None:
        client, task, exchange = await h.streaming()
        client.on_complete = client.leave  # the disconnect arrives with the response's last message
        await client.watched.wait()  # the watcher is listening
        await exchange.end()
        await finished(task)
        assert client.completed()
        assert (h.coordinator.active, h.coordinator.released) == (0, 1), "the release was cut short"

    caplog.set_level("INFO", "model_orchestrator.proxy")
    run(scenario)
    assert "disconnected" not in caplog.text


def test_a_stream_waiting_for_its_model_gets_comments_then_the_models_events_unchanged() -> None:
    async def scenario(h: Harness) -> None:
        h.coordinator.hold = asyncio.Event()
        client = Client(chat())
        task = h.request(client)
        assert (await client.next_body()).startswith(b": loading m ")
        assert client.sent[0]["status"] == 200  # committed by the first comment
        assert (await client.next_body()).startswith(b": loading m ")  # and again, every KEEP_ALIVE
        h.coordinator.hold.set()
        exchange = await h.upstream.next()
        await exchange.head(SSE)
        await exchange.chunk(b"data: 1\n\n")
        await exchange.end()
        await finished(task)
        bodies = [m["body"] for m in client.sent if m["type"] == "http.response.body"]
        assert b"data: 1\n\n" in bodies and client.completed()
        assert [m["type"] for m in client.sent].count("http.response.start") == 1
        assert (h.coordinator.active, h.coordinator.released) == (0, 1)

    run(scenario)


def test_a_client_that_leaves_during_the_comments_gives_its_admission_up() -> None:
    async def scenario(h: Harness) -> None:
        h.coordinator.hold = asyncio.Event()
        client = Client(chat())
        task = h.request(client)
        assert (await client.next_body()).startswith(b": loading m ")
        client.leave()
        await finished(task)
        assert h.coordinator.cancelled_waits == 1 and (h.coordinator.active, h.coordinator.released) == (0, 0)

    run(scenario)


def test_a_refusal_after_the_comments_is_an_error_event() -> None:
    async def scenario(h: Harness) -> None:
        h.coordinator.hold = asyncio.Event()
        client = Client(chat())
        task = h.request(client)
        assert (await client.next_body()).startswith(b": loading m ")
        h.coordinator.refusal = Refused(Reason.START_FAILED, "Model 'm' failed to start: boom")
        h.coordinator.hold.set()
        await finished(task)
        last = client.sent[-1]
        assert last["more_body"] is False and json.loads(last["body"][len(b"data: "):])["error"]["code"] == (
            "model_start_failed")

    run(scenario)


def test_a_refusal_from_the_coordinator_is_answered_with_its_http_error() -> None:
    async def scenario(h: Harness) -> None:
        h.coordinator.refusal = Refused(Reason.QUEUE_FULL, "Too many requests are waiting.", retry_after=3)
        client = Client(chat())
        await finished(h.request(client))
        assert client.sent[0]["status"] == 503 and client.headers()[b"retry-after"] == b"3"
        error = json.loads(client.sent[1]["body"])["error"]
        assert (error["code"], error["message"]) == ("queue_full", "Too many requests are waiting.")
        assert h.upstream.exchanges.empty()

    run(scenario)


def test_an_error_answer_that_breaks_off_after_the_comments_is_still_an_error_event() -> None:
    # #19: after loading comments a non-stream answer is turned into an error event; reading its body
    # was outside the relay's guard, so an upstream dying there escaped the proxy: no event, no release
    # accounting, and the client saw the connection drop.
    async def scenario(h: Harness) -> None:
        h.coordinator.hold = asyncio.Event()
        client = Client(chat())
        task = h.request(client)
        assert (await client.next_body()).startswith(b": loading m ")
        h.coordinator.hold.set()
        exchange = await h.upstream.next()
        await exchange.raw(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                           b"content-length: 100\r\n\r\n")
        exchange.die()  # before a byte of its body
        await finished(task)
        last = client.sent[-1]
        assert last["more_body"] is False and last["body"].startswith(b"data: ")
        error = json.loads(last["body"][len(b"data: "):])["error"]
        assert error["code"] == "upstream_error" and "'m' broke off the response" in error["message"]
        assert [m["type"] for m in client.sent].count("http.response.start") == 1
        assert (h.coordinator.active, h.coordinator.released) == (0, 1)

    run(scenario)

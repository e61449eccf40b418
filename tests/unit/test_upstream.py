"""The data path's HTTP/1.1 client (model_orchestrator/upstream.py) against a scripted raw-socket server.

Real sockets on 127.0.0.1, in this process: each test's server answers with the bytes the test
gives it, so framing, reuse, timeouts and backpressure are checked byte for byte. Every test runs
on both event loops: asyncio's and uvloop's (the orchestrator's), whose transports differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from core.common.errors import ServiceError
from model_orchestrator import upstream
from model_orchestrator.proxy import _request_headers
from model_orchestrator.upstream import (
    HIGH_WATER,
    ConnectFailed,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    request_head,
    request_start,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    def runner(coro: Coroutine[Any, Any, None]) -> None:
        loop = asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
        try:
            loop.run_until_complete(coro)
        finally:
            loop.close()
    return runner


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


class Server:
    """Answers each request on each connection with the next of ``answers`` (or calls it, if callable);
    ``pool`` is the client's, closed with the server."""

    def __init__(self, *answers: bytes | Handler, idle_max: float = 4.0) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self.pool = UpstreamPool(idle_max=idle_max)
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self.pool.close()
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0)  # the transports' close callbacks

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while self.answers:
                self.requests.append(await read_request(reader))
                answer = self.answers.pop(0)
                if callable(answer):
                    await answer(reader, writer)
                    continue
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for ``condition`` (checked every millisecond) instead of a fixed sleep; fail past ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met within the timeout"
        await asyncio.sleep(0.001)


def head(method: bytes = b"POST", port: int = 0, body: bytes = b"", headers: bytes = b"") -> bytes:
    return request_head(request_start(method, b"/v1/x", "127.0.0.1", port), method, headers, body)


async def exchange(pool: UpstreamPool, port: int, body: bytes = b'{"a":1}', timeout: float = 5.0,
                   method: bytes = b"POST") -> tuple[int, bytes]:
    conn = await pool.request("127.0.0.1", port, method, head(method, port, body), body, timeout)
    try:
        return conn.status, await conn.read_up_to(1 << 30)
    finally:
        pool.release(conn)


# -- the request head ---------------------------------------------------------------------------


def test_the_head_carries_host_and_a_length_for_every_body_and_every_method_that_takes_one() -> None:
    start = request_start(b"POST", b"/v1/chat/completions", "127.0.0.1", 8001)
    assert start == b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8001\r\n"
    assert request_head(start, b"POST", b"X-A: 1\r\n", b"{}") == start + b"X-A: 1\r\nContent-Length: 2\r\n\r\n"
    assert request_head(start, b"POST", b"", b"").endswith(b"Content-Length: 0\r\n\r\n")
    get = request_start(b"GET", b"/health", "::1", 9)
    assert get == b"GET /health HTTP/1.1\r\nHost: [::1]:9\r\n"
    assert request_head(get, b"GET", b"", b"") == get + b"\r\n"


@pytest.mark.parametrize("value", [b"1\r\nX-Evil: 2", b"1\nX-Evil: 2", b"1\rX", b"\r\n"])
def test_a_header_value_with_a_line_break_never_reaches_a_service(value: bytes) -> None:
    # uvicorn's parsers refuse these already; the proxy checks again where headers become request bytes
    with pytest.raises(ServiceError) as refused:
        _request_headers([(b"x-a", value)], "token")
    assert (refused.value.status, refused.value.code) == (400, "invalid_header")
    assert _request_headers([(b"x-a", b"1"), (b"connection", b"x-b"), (b"x-b", b"2")], "t") == (
        b"x-a: 1\r\nAuthorization: Bearer t\r\n")


# -- framing and reuse ----------------------------------------------------------------------------


def test_a_complete_answer_leaves_its_connection_for_the_next_request(run: Any) -> None:
    async def scenario() -> None:
        async with Server(OK, OK) as server:
            pool = server.pool
            assert await exchange(pool, server.port) == (200, b"{}")
            assert await exchange(pool, server.port) == (200, b"{}")
            assert server.connections == 1
            assert server.requests[0].endswith(b"Content-Length: 7\r\n\r\n{\"a\":1}")
    run(scenario())


def test_a_chunked_answer_is_handed_over_decoded_and_the_headers_as_sent(run: Any) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\nX-Case: Kept\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    async def scenario() -> None:
        async with Server(chunked, OK) as server:
            pool = server.pool
            conn = await pool.request("127.0.0.1", server.port, b"GET", head(b"GET"), b"", 5)
            assert conn.content_type() == "text/event-stream"
            assert (b"X-Case", b"Kept") in conn.headers
            assert await conn.read_up_to(1000) == b"hello world"
            pool.release(conn)
            assert await exchange(pool, server.port) == (200, b"{}")
            assert server.connections == 1
    run(scenario())


def test_an_answer_ended_by_closing_is_complete_and_its_connection_not_reused(run: Any) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with Server(until_close) as server:
            pool = server.pool
            assert await exchange(pool, server.port) == (200, b"all of it")
            server.answers.append(OK)
            assert await exchange(pool, server.port) == (200, b"{}")
            assert server.connections == 2
    run(scenario())


def test_an_answer_left_unread_closes_its_connection(run: Any) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"  # half of the body, then nothing

    async def scenario() -> None:
        async with Server(big, OK) as server:
            pool = server.pool
            conn = await pool.request("127.0.0.1", server.port, b"POST", head(), b"", 5)
            assert await conn.read() == b"01234"
            pool.release(conn)  # mid-answer: the rest would be read as the next answer's start
            assert conn.closed
            assert await exchange(pool, server.port) == (200, b"{}")
            assert server.connections == 2
    run(scenario())


def test_an_informational_answer_is_skipped_and_a_head_answer_has_no_body(run: Any) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK

    async def scenario() -> None:
        async with Server(early, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", OK) as server:
            pool = server.pool
            assert await exchange(pool, server.port) == (200, b"{}")
            assert await exchange(pool, server.port, b"", method=b"HEAD") == (200, b"")
            assert await exchange(pool, server.port) == (200, b"{}")  # on a new connection: HEAD's is not reused
            assert server.connections == 2
    run(scenario())


def test_a_connection_idle_past_idle_max_or_closed_by_the_service_is_not_reused(run: Any) -> None:
    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # keep-alive allowed, but the service closes it just after
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with Server(OK, OK, idle_max=0.05) as server:
            pool = server.pool
            await exchange(pool, server.port)
            await asyncio.sleep(0.1)
            await exchange(pool, server.port)
            assert server.connections == 2
        async with Server(answer_and_close, OK) as server:
            pool = server.pool
            await exchange(pool, server.port)
            await until(lambda: not pool._idle[("127.0.0.1", server.port)])  # its close took it out of the pool
            assert await exchange(pool, server.port) == (200, b"{}")
            assert server.connections == 2
    run(scenario())


# -- failures ---------------------------------------------------------------------------------------


def test_a_closed_port_is_connect_failed(run: Any) -> None:
    async def scenario() -> None:
        async with Server() as server:
            port = server.port
        with pytest.raises(ConnectFailed, match=f"cannot connect to 127.0.0.1:{port}"):
            await exchange(server.pool, port)
    run(scenario())


@pytest.mark.parametrize(("answer", "message"), [
    (b"garbage\r\n\r\n", "not an HTTP answer"),
    (b"", "closed the connection"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "closed the connection"),
])
def test_a_broken_answer_is_an_upstream_error(run: Any, answer: bytes, message: str) -> None:
    async def break_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with Server(break_off) as server:
            with pytest.raises(UpstreamError, match=message) as caught:
                await exchange(server.pool, server.port)
            assert not isinstance(caught.value, UpstreamTimeout)
    run(scenario())


def test_silence_before_the_answer_and_between_its_pieces_times_out(run: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1)

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):  # a piece every 0.1 s: never silent for 1 s
            writer.write(b"1\r\nx\r\n")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with Server(silent) as server:
            with pytest.raises(UpstreamTimeout, match=r"nothing from the service for 0\.3s"):
                await exchange(server.pool, server.port, timeout=0.3)
        async with Server(trickle) as server:
            pool = server.pool
            conn = await pool.request("127.0.0.1", server.port, b"POST", head(), b"", 1.0)
            got = b""
            with pytest.raises(UpstreamTimeout):
                while chunk := await conn.read():
                    got += chunk
            assert got == b"xxxx"
            pool.release(conn)
            assert conn.closed
    run(scenario())


def test_reading_pauses_while_the_answer_waits_for_a_slow_client_and_silence_is_not_counted(run: Any) -> None:
    size = 16 * 1024 * 1024

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()

    async def scenario() -> None:
        async with Server(large) as server:
            pool = server.pool
            conn = await pool.request("127.0.0.1", server.port, b"POST", head(), b"", 0.2)
            await asyncio.sleep(0.5)  # a client that reads nothing, for longer than the read timeout
            buffered = sum(len(piece) for piece in conn._body)
            assert conn._paused and buffered < HIGH_WATER + 1024 * 1024, "reading did not pause"
            assert len(await conn.read_up_to(size + 1)) == size
            pool.release(conn)
            assert not conn.closed
    run(scenario())


def test_an_answer_complete_while_reading_was_paused_leaves_a_connection_that_reads_again(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "HIGH_WATER", 4)  # so that an answer arriving in one read pauses reading as it ends

    async def scenario() -> None:
        async with Server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", OK) as server:
            pool = server.pool
            conn = await pool.request("127.0.0.1", server.port, b"POST", head(), b"", 5)
            await asyncio.sleep(0.1)  # a client that left: all of it arrived, none was read
            assert conn.complete and conn._paused
            pool.release(conn)
            assert await exchange(pool, server.port, timeout=2) == (200, b"{}")
            assert server.connections == 1
    run(scenario())


def test_bytes_after_an_answer_leave_it_whole_and_the_connection_unused(run: Any) -> None:
    second = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nab"

    async def stray_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"H")  # while the connection is idle in the pool

    async def scenario() -> None:
        async with Server(OK + second, OK) as server:
            assert await exchange(server.pool, server.port) == (200, b"{}")
            assert await exchange(server.pool, server.port) == (200, b"{}")
            assert server.connections == 2
        async with Server(stray_later, OK) as server:
            assert await exchange(server.pool, server.port) == (200, b"{}")
            await asyncio.sleep(0.2)
            assert await exchange(server.pool, server.port) == (200, b"{}")
            assert server.connections == 2
    run(scenario())


def test_a_reused_connection_closed_as_a_request_goes_out_is_retried_for_idempotent_methods_only(run: Any) -> None:
    async def close_unanswered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # read the request, answered nothing: as a keep-alive timeout racing it would

    async def scenario() -> None:
        async with Server(OK, close_unanswered, OK) as server:
            assert await exchange(server.pool, server.port) == (200, b"{}")
            assert await exchange(server.pool, server.port, b"", method=b"GET") == (200, b"{}")
            assert server.connections == 2 and len(server.requests) == 3
        async with Server(OK, close_unanswered, OK) as server:
            assert await exchange(server.pool, server.port) == (200, b"{}")
            with pytest.raises(UpstreamError, match="closed the connection"):
                await exchange(server.pool, server.port)  # a POST is never sent twice
            assert len(server.requests) == 2
    run(scenario())


def test_a_service_that_stops_reading_a_large_body_times_out(run: Any) -> None:
    held: list[asyncio.StreamWriter] = []

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    async def scenario() -> None:
        server = await asyncio.start_server(never_read, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        body = b"x" * (32 * 1024 * 1024)  # more than both sockets' buffers hold
        try:
            with pytest.raises(UpstreamTimeout):
                await pool.request("127.0.0.1", port, b"POST", head(body=body), body, 0.5)
        finally:
            pool.close()
            for writer in held:
                writer.transport.abort()
            server.close()
            await server.wait_closed()
    run(scenario())


def test_a_request_cancelled_while_it_waits_leaves_no_connection_behind(run: Any) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)
        writer.write(OK)

    async def scenario() -> None:
        async with Server(slow) as server:
            task = asyncio.ensure_future(exchange(server.pool, server.port))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert server.pool._idle.get(("127.0.0.1", server.port), []) == []
    run(scenario())


def test_a_connection_reset_at_once_is_an_upstream_error_every_time(run: Any) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    async def scenario() -> None:
        server = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool()
        try:
            for _ in range(20):  # the reset lands before, while or after the request is written
                with pytest.raises(UpstreamError):
                    await exchange(pool, port)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()
    run(scenario())

"""http_server: the header deadline on a real uvicorn (raw sockets, both HTTP implementations),
server_options, RequestCap and AccessGate (ASGI level)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.common.asgi import Message, Receive, Scope, Send, send_json
from core.config.schema import Limits
from model_orchestrator import auth
from model_orchestrator.http_server import AccessGate, HeaderDeadline, RequestCap, server_options
from tests.integration import raw_http
from tests.integration.conftest import free_port, wait_until


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers after reading the whole body; ``/slow`` takes 2.5 s more; ``/early`` answers
    without reading the body (as a refusal does)."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/early":
        await send_json(send, 401, b"{}")
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"] == "/slow":
        await asyncio.sleep(2.5)
    await send_json(send, 200, b"{}")


@pytest.fixture(params=["httptools", "h11"])
def implementation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def server(implementation: str, **limits: Any) -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(slow_app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                            **server_options(Limits(**limits), implementation))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: srv.started, 10)
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)


# --- the header deadline (slowloris) -----------------------------------------------------------


@pytest.mark.parametrize(("implementation", "base"), [("auto", HttpToolsProtocol), ("h11", H11Protocol)])
def test_server_options_give_uvicorn_our_protocol(implementation: str, base: type) -> None:
    options = server_options(Limits(header_timeout=3, max_connections=7, keep_alive_timeout=2), implementation)
    config = uvicorn.Config(slow_app, **options)
    config.load()
    assert issubclass(config.http_protocol_class, HeaderDeadline)
    assert issubclass(config.http_protocol_class, base)  # auto: httptools, installed here as in production
    assert config.http_protocol_class.header_timeout == 3
    assert (config.limit_concurrency, config.timeout_keep_alive) == (7, 2)
    assert config.h11_max_incomplete_event_size == 64 * 1024


def test_connections_that_never_finish_their_headers_are_closed(implementation: str) -> None:
    with server(implementation, header_timeout=1) as port:
        idle = [raw_http.connect(port) for _ in range(100)]
        trickling = [raw_http.connect(port) for _ in range(100)]
        try:
            for sock in trickling:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):  # a byte now and then would reset uvicorn's keep-alive timer
                time.sleep(0.4)
                for sock in trickling:
                    # The last bytes go out past the deadline: a connection already closed refuses them.
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        sock.sendall(b"X")
            assert all(raw_http.closed_by_peer(sock, wait=3) for sock in idle + trickling)
            assert raw_http.request(port, "GET", "/").status == 200
        finally:
            for sock in idle + trickling:
                sock.close()


def test_the_deadline_restarts_after_each_response_and_spares_slow_handlers(implementation: str) -> None:
    with server(implementation, header_timeout=2, keep_alive_timeout=30) as port, raw_http.connect(port) as sock:
        sock.sendall(raw_http.head("GET", "/slow"))  # the handler outlasts the header deadline
        assert raw_http.read_response(sock).status == 200  # (+0.5 s: it checks the connection stays open)
        time.sleep(0.5)
        sock.sendall(raw_http.head("GET", "/"))  # 3.5 s after connecting: the deadline restarted
        assert raw_http.read_response(sock).status == 200
        sock.sendall(b"GET / HTTP/1.1\r\n")  # then a request that never completes its headers
        assert raw_http.closed_by_peer(sock, wait=4)


def test_a_slow_body_is_not_the_header_deadline_business(implementation: str) -> None:
    with server(implementation, header_timeout=1) as port, raw_http.connect(port) as sock:
        sock.sendall(raw_http.head("POST", "/", length=4) + b"ab")
        time.sleep(1.5)  # body deadlines are the app's (proxy: body_timeout)
        sock.sendall(b"cd")
        assert raw_http.read_response(sock).status == 200


def test_unfinished_headers_are_not_buffered_past_64_kib(implementation: str) -> None:
    with server(implementation) as port, raw_http.connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: ")
        with contextlib.suppress(ConnectionError):  # the server may close while we still send
            for _ in range(16):
                sock.sendall(b"x" * 8 * 1024)
        response = raw_http.read_response(sock)
    assert response.status == 400 and response.closed


def test_large_bodies_are_not_mistaken_for_large_headers(implementation: str) -> None:
    with server(implementation) as port:
        assert raw_http.request(port, "POST", "/", body=b"x" * 1024 * 1024).status == 200


def test_an_unread_body_after_an_early_answer_closes_without_a_second_answer(implementation: str) -> None:
    with server(implementation) as port, raw_http.connect(port) as sock:
        sock.sendall(raw_http.head("POST", "/early", length=1024 * 1024))
        with contextlib.suppress(ConnectionError):
            for _ in range(16):
                sock.sendall(b"x" * 64 * 1024)
        response = raw_http.read_response(sock)
        assert response.status == 401 and response.closed


# --- RequestCap -------------------------------------------------------------------------------------


class Gate:
    """An app whose requests wait until released, recording what reached it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(scope.get("path", scope["type"]))
        if scope["type"] == "http" and scope["path"] != "/health":
            await self.release.wait()
        await send_json(send, 200, b"{}")


async def turns_until(predicate: Callable[[], bool], bound: int = 100) -> None:
    """Lets the loop run (no clock) until ``predicate`` holds, at most ``bound`` turns."""
    for _ in range(bound):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not true after {bound} loop turns")


async def call(app: Any, path: str, kind: str = "http") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": kind, "path": path, "method": "GET", "headers": []}, receive, send)
    return sent


def test_requests_past_the_cap_get_503_and_health_passes() -> None:
    async def scenario() -> None:
        gate = Gate()
        cap = RequestCap(gate, max_requests=2)
        held = [asyncio.create_task(call(cap, f"/v1/held{i}")) for i in range(2)]
        await turns_until(lambda: len(gate.seen) == 2)  # both held inside the app
        assert cap.active == 2
        refused = await call(cap, "/v1/chat/completions")
        assert refused[0]["status"] == 503
        assert (b"retry-after", b"1") in refused[0]["headers"]
        assert b'"code": "overloaded"' in refused[1]["body"]
        assert (await call(cap, "/health"))[0]["status"] == 200
        assert (await call(cap, "/", kind="lifespan"))[0]["status"] == 200  # passes through uncounted
        gate.release.set()
        assert [(await task)[0]["status"] for task in held] == [200, 200]
        assert cap.active == 0
        assert (await call(cap, "/v1/again"))[0]["status"] == 200
        assert "/v1/chat/completions" not in gate.seen

    asyncio.run(scenario())


def test_the_count_drops_when_a_request_fails() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        cap = RequestCap(failing, max_requests=1)
        with pytest.raises(RuntimeError):
            await call(cap, "/v1/x")
        assert cap.active == 0

    asyncio.run(scenario())


# --- AccessGate (the policy itself: tests/unit/test_auth.py) ------------------------------------------


async def gated_call(gate: AccessGate, path: str, *headers: tuple[bytes, bytes], kind: str = "http",
                     method: str = "POST") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await gate({"type": kind, "path": path, "method": method, "headers": list(headers)}, receive, send)
    return sent


def test_the_access_gate_answers_refusals_itself_and_passes_the_rest() -> None:
    async def scenario() -> None:
        app = Gate()
        app.release.set()
        gate = AccessGate(app, auth.Keys.of(["client-key"], ["admin-key"]), loopback_bind=True)
        missing = await gated_call(gate, "/v1/chat/completions")
        assert missing[0]["status"] == 401 and b'"code": "invalid_api_key"' in missing[1]["body"]
        client_on_admin = await gated_call(gate, "/status", (b"authorization", b"Bearer client-key"), method="GET")
        assert client_on_admin[0]["status"] == 403
        cross_site = await gated_call(gate, "/status", (b"authorization", b"Bearer admin-key"),
                                      (b"sec-fetch-site", b"cross-site"), method="GET")
        assert cross_site[0]["status"] == 403
        assert (await gated_call(gate, "/health", method="GET"))[0]["status"] == 200
        assert (await gated_call(gate, "/v1/x", (b"authorization", b"Bearer client-key")))[0]["status"] == 200
        assert await gated_call(gate, "/ws", kind="websocket") == []  # no route takes websockets
        assert app.seen == ["/health", "/v1/x"]

    asyncio.run(scenario())


def test_without_keys_the_access_gate_lets_websockets_through() -> None:
    """(To the control app, which refuses them itself.)"""

    async def scenario() -> None:
        app = Gate()
        await gated_call(AccessGate(app, auth.Keys.of([], []), loopback_bind=True), "/ws", kind="websocket")
        assert app.seen == ["/ws"]

    asyncio.run(scenario())

"""core/runtime/middleware.py, one middleware at a time, at the ASGI level with hand-driven
``receive``/``send``; then their order in BaseService.create_app (socket-level tests of a
real service: tests/integration/test_base_service.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import pytest
from fastapi import FastAPI

from core.base_service import BaseService, Health
from core.common.asgi import Message, Receive, Scope, Send, send_json
from core.runtime.middleware import CancelOnDisconnect, ConcurrencyCap, ReadinessGate, ServiceTokenAuth

TOKEN = "t0ken"


class Client:
    """One hand-driven connection: the messages the server hands the app, and what the app sent."""

    def __init__(self, *messages: Message) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        for message in messages:
            self.inbox.put_nowait(message)
        self.sent: list[Message] = []
        self.started = asyncio.Event()  # the response has begun

    async def receive(self) -> Message:
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.started.set()

    def leave(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    def error_code(self) -> str:
        return str(json.loads(self.sent[1]["body"])["error"]["code"])


def scope(path: str = "/v1/x", headers: Iterable[tuple[bytes, bytes]] = (), kind: str = "http") -> Scope:
    return {"type": kind, "method": "POST", "path": path, "headers": list(headers), "query_string": b"",
            "http_version": "1.1", "scheme": "http", "root_path": ""}


def request(body: bytes = b"{}") -> Message:
    return {"type": "http.request", "body": body, "more_body": False}


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, 200, b'{"ok": true}')


async def call(app: Any, the_scope: Scope, *messages: Message) -> Client:
    client = Client(*messages)
    await app(the_scope, client.receive, client.send)
    return client


# --- ServiceTokenAuth ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [[], bearer("wrong"), [(b"authorization", TOKEN.encode())]])
def test_a_request_without_the_token_is_401_with_www_authenticate(headers: list[tuple[bytes, bytes]]) -> None:
    client = asyncio.run(call(ServiceTokenAuth(ok_app, TOKEN), scope(headers=headers), request()))
    assert client.status == 401 and client.error_code() == "invalid_service_token"
    assert client.headers[b"www-authenticate"] == b"Bearer"


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/x", bearer(TOKEN), 200),
    ("/health", [], 200),  # probes need no token
    ("/docs", [], 401),  # past readiness and the cap, but not past auth
    ("/openapi.json", [], 401),
])
def test_the_token_opens_every_route_and_health_needs_none(
        path: str, headers: list[tuple[bytes, bytes]], status: int) -> None:
    assert asyncio.run(call(ServiceTokenAuth(ok_app, TOKEN), scope(path, headers), request())).status == status


def test_a_websocket_without_the_token_is_closed_with_1008() -> None:
    client = asyncio.run(call(ServiceTokenAuth(ok_app, TOKEN), scope("/ws", kind="websocket"),
                              {"type": "websocket.connect"}))
    assert client.sent == [{"type": "websocket.close", "code": 1008}]
    assert client.inbox.empty(), "the connect message was read before closing"


# --- ReadinessGate -----------------------------------------------------------------------------


def test_not_ready_is_503_with_the_reason_and_retry_after() -> None:
    client = asyncio.run(call(ReadinessGate(ok_app, lambda: "echo is loading"), scope(), request()))
    assert client.status == 503 and client.error_code() == "model_not_ready"
    assert client.headers[b"retry-after"] == b"5"
    assert json.loads(client.sent[1]["body"])["error"]["message"] == "echo is loading"


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json"])
def test_health_and_docs_pass_while_not_ready(path: str) -> None:
    assert asyncio.run(call(ReadinessGate(ok_app, lambda: "loading"), scope(path), request())).status == 200


def test_ready_passes() -> None:
    assert asyncio.run(call(ReadinessGate(ok_app, lambda: None), scope(), request())).status == 200


# --- ConcurrencyCap ----------------------------------------------------------------------------


class Held:
    """An app whose requests stay in progress until ``release`` is set."""

    def __init__(self) -> None:
        self.entered = asyncio.Queue[str]()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/v1/held":
            self.entered.put_nowait(scope["path"])
            await self.release.wait()
        await ok_app(scope, receive, send)


def test_past_the_cap_is_429_and_health_and_docs_pass() -> None:
    async def scenario() -> None:
        app = Held()
        cap = ConcurrencyCap(app, 1)
        held = asyncio.create_task(call(cap, scope("/v1/held"), request()))
        await app.entered.get()
        refused = await call(cap, scope(), request())
        assert refused.status == 429 and refused.error_code() == "overloaded"
        assert refused.headers[b"retry-after"] == b"1"
        for path in ("/health", "/docs", "/openapi.json"):
            assert (await call(cap, scope(path), request())).status == 200
        app.release.set()
        assert (await held).status == 200
        assert cap.active == 0
        assert (await call(cap, scope(), request())).status == 200

    asyncio.run(scenario())


def test_the_count_drops_when_a_request_fails() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        cap = ConcurrencyCap(failing, 1)
        with pytest.raises(RuntimeError):
            await call(cap, scope(), request())
        assert cap.active == 0

    asyncio.run(scenario())


# --- CancelOnDisconnect --------------------------------------------------------------------------


class Handler:
    """Reads its body, then works until ``finish`` is set; records how it ended."""

    def __init__(self) -> None:
        self.body = b""
        self.working = asyncio.Event()
        self.finish = asyncio.Event()
        self.outcome = "running"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.working.set()
        try:
            await self.finish.wait()
            await ok_app(scope, receive, send)
            await asyncio.sleep(0)  # work after the response (a background task's cleanup)
            self.outcome = "finished"
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise


def test_a_disconnect_while_working_cancels_the_handler(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        handler = Handler()
        client = Client(request())
        task = asyncio.create_task(CancelOnDisconnect(handler)(scope("/v1/work"), client.receive, client.send))
        await handler.working.wait()
        client.leave()
        await task  # returns normally: the cancellation is taken as the client's doing
        assert handler.outcome == "cancelled" and client.sent == []

    caplog.set_level("INFO", "core.runtime.middleware")
    asyncio.run(scenario())
    assert "client disconnected: POST /v1/work cancelled" in caplog.text


def test_a_disconnect_as_the_response_completes_cancels_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """The server hands over ``http.disconnect`` once a response is complete, too (uvicorn does)."""

    async def scenario() -> None:
        handler = Handler()
        client = Client(request())

        async def send(message: Message) -> None:
            await client.send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                client.leave()
                await asyncio.sleep(0)  # the watcher gets the disconnect before the handler goes on

        await asyncio.gather(CancelOnDisconnect(handler)(scope(), client.receive, send), _set_when(handler))
        assert handler.outcome == "finished"

    caplog.set_level("INFO", "core.runtime.middleware")
    asyncio.run(scenario())
    assert "disconnected" not in caplog.text


async def _set_when(handler: Handler) -> None:
    await handler.working.wait()
    handler.finish.set()


def test_the_body_is_replayed_whole_and_a_disconnect_is_passed_on() -> None:
    """A response that listens for the disconnect in a task of its own (Starlette's streaming
    response does) still hears it, while the handler itself is cancelled."""
    received: list[Message] = []

    async def listen(receive: Receive) -> None:
        received.append(await receive())
        listening.set()
        received.append(await receive())

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        listeners.append(asyncio.create_task(listen(receive)))
        await asyncio.Event().wait()  # streams until cancelled

    async def scenario() -> None:
        parts = [{"type": "http.request", "body": part, "more_body": part != b"c"} for part in (b"a", b"b", b"c")]
        client = Client(*parts)
        task = asyncio.create_task(CancelOnDisconnect(streaming)(scope(), client.receive, client.send))
        await listening.wait()
        client.leave()
        await task
        await listeners[0]

    listening = asyncio.Event()
    listeners: list[asyncio.Task[None]] = []
    asyncio.run(scenario())
    assert received == [{"type": "http.request", "body": b"abc", "more_body": False}, {"type": "http.disconnect"}]


def test_a_client_gone_before_its_body_arrived_never_reaches_the_app() -> None:
    handler = Handler()
    client = asyncio.run(call(CancelOnDisconnect(handler), scope(), {"type": "http.request", "body": b"a",
                                                                      "more_body": True}, {"type": "http.disconnect"}))
    assert client.sent == [] and not handler.working.is_set()


def test_health_is_not_watched() -> None:
    """/health is answered without the body being read first (nothing to cancel there)."""
    seen: list[Message] = []

    async def health(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        await ok_app(scope, receive, send)

    client = asyncio.run(call(CancelOnDisconnect(health), scope("/health"), request(b"x")))
    assert client.status == 200 and seen == [request(b"x")]


# --- the order in BaseService.create_app ------------------------------------------------------------


class Service(BaseService):
    name = "unit"

    async def load(self) -> None:
        pass

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/echo")
        async def echo() -> dict[str, bool]:
            return {"ok": True}


def service_app(*, token: str | None = None, health: Health = Health.READY, max_concurrency: int | None = None) -> Any:
    service = Service()
    service.service_token, service.health, service.max_concurrency = token, health, max_concurrency
    return service.create_app()


def test_auth_comes_before_readiness() -> None:
    app = service_app(token=TOKEN, health=Health.LOADING)
    assert asyncio.run(call(app, scope("/v1/echo"), request())).status == 401
    assert asyncio.run(call(app, scope("/v1/echo", bearer(TOKEN)), request())).status == 503


def test_readiness_comes_before_the_cap() -> None:
    app = service_app(health=Health.LOADING, max_concurrency=0)
    assert asyncio.run(call(app, scope("/v1/echo"), request())).status == 503


def test_without_token_or_cap_a_ready_service_answers() -> None:
    client = asyncio.run(call(service_app(), scope("/v1/echo"), request()))
    assert client.status == 200 and json.loads(client.sent[1]["body"]) == {"ok": True}

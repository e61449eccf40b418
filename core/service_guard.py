"""ASGI middleware every model service runs behind: service token, readiness gate, concurrency cap, disconnects.

* With a service token (``AIO_SERVICE_TOKEN``, set by the orchestrator for each run) every
  route but ``/health`` requires ``Authorization: Bearer <token>``, else 401. The service
  port listens on loopback, but loopback is not private: other local users, and tailnet
  peers when Tailscale runs in userspace networking mode, reach it too (see core/child_env.py).
* Before the model is ready (or after a fatal error) requests get 503 + Retry-After;
  ``/health`` always passes through.
* Past ``max_concurrency`` requests in progress, new ones get 429 at once (shed load
  instead of queueing without bound; the orchestrator does the queueing).
* If the client disconnects while its request is still being worked on, the handler
  is cancelled, so GPU time is not spent on an answer nobody will read.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from core.child_env import SERVICE_TOKEN_ENV
from core.errors import ServiceError, error_bytes

log = logging.getLogger(__name__)

ASGIApp = Callable[..., Any]


def take_service_token(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The service token from the environment, removed from it so that whatever this
    service starts (engine workers, compilers) does not inherit it. Read once, at startup."""
    return environ.pop(SERVICE_TOKEN_ENV, None) or None


class ServiceGuard:
    def __init__(
        self, app: ASGIApp, is_ready: Callable[[], str | None], max_concurrency: int | None,
        service_token: str | None = None,
    ) -> None:
        self.app = app
        self.is_ready = is_ready  # returns None when ready, else why not
        self.max_concurrency = max_concurrency
        self.active = 0
        self._expected = None if service_token is None else f"Bearer {service_token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] != "/health" and not self._authorized(scope):
            await _refuse(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] in ("/health", "/docs", "/openapi.json"):
            await self.app(scope, receive, send)
            return
        not_ready = self.is_ready()
        if not_ready is not None:
            await _reject(send, ServiceError(503, not_ready, "model_not_ready", retry_after=5))
            return
        if self.max_concurrency is not None and self.active >= self.max_concurrency:
            await _reject(send, ServiceError(
                429, f"Service is at its concurrency limit ({self.max_concurrency}); retry shortly.",
                "overloaded", retry_after=1))
            return
        self.active += 1
        try:
            await _run_cancelling_on_disconnect(self.app, scope, receive, send)
        finally:
            self.active -= 1

    def _authorized(self, scope: dict[str, Any]) -> bool:
        if self._expected is None:
            return True
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)  # constant time: no guessing byte by byte


async def _refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect; closing before accept answers it with 403
        await send({"type": "websocket.close", "code": 1008})
        return
    await _reject(send, ServiceError(
        401, "This service answers its orchestrator only: send the orchestrator's service token "
        "as 'Authorization: Bearer <token>'.", "invalid_service_token"), {"www-authenticate": "Bearer"})


async def _run_cancelling_on_disconnect(app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Run ``app``; a client disconnect before the response is complete cancels it.

    The body is read here first and replayed to the app, so this wrapper is the only
    reader of ``receive`` and notices a disconnect even while a handler that never
    reads the body (or has read all of it) is still working.
    """
    body = await _read_body_messages(receive)
    if body is None:
        return  # gone before the request was complete
    owner = asyncio.current_task()
    disconnected = asyncio.Event()
    state = {"done": False, "fired": False}

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            continue
        disconnected.set()
        if not state["done"] and owner is not None:  # disconnect also arrives after a complete response
            state["fired"] = True
            owner.cancel()

    async def replay_receive() -> Any:
        if body:
            return body.pop(0)
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def tracked_send(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            state["done"] = True
        await send(message)

    watcher = asyncio.create_task(watch())
    try:
        await app(scope, replay_receive, tracked_send)
    except asyncio.CancelledError:
        if not state["fired"]:
            raise
        log.info("client disconnected: %s %s cancelled", scope["method"], scope["path"])
    finally:
        state["done"] = True
        watcher.cancel()


async def _read_body_messages(receive: Any) -> list[dict[str, Any]] | None:
    messages = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        messages.append(message)
        if not message.get("more_body"):
            return messages


async def _reject(send: Any, exc: ServiceError, extra_headers: dict[str, str] | None = None) -> None:
    body = error_bytes(exc.message, exc.status, exc.code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in {**exc.headers(), **(extra_headers or {})}.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

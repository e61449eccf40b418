"""The ASGI middlewares every model service runs behind, one job each (composed in
core/base_service.py, outermost first, in the order below).

* ``ServiceTokenAuth``: with a service token (``AIO_SERVICE_TOKEN``, set by the orchestrator
  for each run) every route but ``/health`` requires ``Authorization: Bearer <token>``,
  else 401 (websockets: closed with 1008). The service port listens on loopback, but
  loopback is not private: other local users, and tailnet peers when Tailscale runs in
  userspace networking mode, reach it too (see core/supervision/child_env.py).
* ``ReadinessGate``: before the model is ready (or after a fatal error) requests get
  503 + Retry-After.
* ``ConcurrencyCap``: past ``max_concurrency`` requests in progress, new ones get 429 at
  once (shed load instead of queueing without bound; the orchestrator does the queueing).
* ``CancelOnDisconnect``: if the client disconnects while its request is still being
  worked on, the handler is cancelled, so GPU time is not spent on an answer nobody reads.

``/health`` always passes every gate; ``/docs`` and ``/openapi.json`` pass all but auth.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
from collections.abc import Callable, MutableMapping

from core.common.asgi import (
    ASGIApp,
    ClientGone,
    DisconnectWatcher,
    Message,
    Receive,
    Scope,
    Send,
    read_body,
    send_error,
)
from core.common.contract import PARK_PATHS, SERVICE_TOKEN_ENV
from core.common.errors import ServiceError
from core.common.in_flight import InFlightCap

log = logging.getLogger(__name__)

# Past readiness, cap and disconnect watch (not past the token). The park routes too: a parked
# service must answer /restore, and a park must not be cut short by its caller leaving.
UNGATED_PATHS = frozenset({"/health", "/docs", "/openapi.json", *PARK_PATHS})


def take_service_token(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The service token from the environment, removed from it so that whatever this
    service starts (engine workers, compilers) does not inherit it. Read once, at startup."""
    return environ.pop(SERVICE_TOKEN_ENV, None) or None


def _gated(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["path"] not in UNGATED_PATHS


class ServiceTokenAuth:
    """Only callers with the service token get past ``/health``."""

    def __init__(self, app: ASGIApp, service_token: str) -> None:
        self.app = app
        self._expected = f"Bearer {service_token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] != "/health" and not self._authorized(scope):
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)  # constant time: no guessing byte by byte

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing before accept answers it with 403
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(send, ServiceError(
            401, "This service answers its orchestrator only: send the orchestrator's service token "
            "as 'Authorization: Bearer <token>'.", "invalid_service_token"), [(b"www-authenticate", b"Bearer")])


class ReadinessGate:
    """503 + Retry-After while ``not_ready()`` gives a reason (loading, stopping, failed)."""

    def __init__(self, app: ASGIApp, not_ready: Callable[[], str | None]) -> None:
        self.app = app
        self.not_ready = not_ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _gated(scope):
            reason = self.not_ready()
            if reason is not None:
                await send_error(send, ServiceError(503, reason, "model_not_ready", retry_after=5))
                return
        await self.app(scope, receive, send)


class ConcurrencyCap(InFlightCap):
    """429 + Retry-After past ``max_concurrency`` requests in progress (the orchestrator queues);
    with ``sys.maxsize``, only the count (``active``, ``idle()``)."""

    def __init__(self, app: ASGIApp, max_concurrency: int) -> None:
        super().__init__(app, max_concurrency, _gated, ServiceError(
            429, f"Service is at its concurrency limit ({max_concurrency}); retry shortly.", "overloaded",
            retry_after=1))


class CancelOnDisconnect:
    """Runs the app; a client that disconnects before the response is complete cancels it.

    The body is read here first and replayed to the app, so this middleware is the only
    reader of ``receive`` and notices a disconnect even while a handler that never reads
    the body (or has read all of it) is still working.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _gated(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, sys.maxsize)  # the service's own routes bound what they accept
        except ClientGone:
            return  # gone before the request was complete
        watcher = DisconnectWatcher(receive)
        try:
            await self.app(scope, _replay(body, watcher), watcher.tracking(send))
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            log.info("client disconnected: %s %s cancelled", scope["method"], scope["path"])
        finally:
            watcher.stop()


def _replay(body: bytes, watcher: DisconnectWatcher) -> Receive:
    """The app's ``receive``: the body already read, then ``http.disconnect`` once the client leaves."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await watcher.disconnected()
        return {"type": "http.disconnect"}

    return receive

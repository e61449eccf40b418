"""Shedding load at a fixed number of requests in progress, for any ASGI app: the model
services' ``ConcurrencyCap`` (core/runtime/middleware.py) and the orchestrator's request cap
(model-orchestrator/http_server.py) are both this one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from core.common.aio import event_within
from core.common.asgi import ASGIApp, Receive, Scope, Send, send_error
from core.common.errors import ServiceError


class InFlightCap:
    """Answers ``refusal`` at once past ``limit`` counted requests in progress (streams count
    until they end): shed load instead of queueing without bound. ``counted`` picks the
    requests that count; the others pass through, so health probes answer under load.
    ``idle()`` waits for the counted requests to end (a park drains them first)."""

    def __init__(self, app: ASGIApp, limit: int, counted: Callable[[Scope], bool], refusal: ServiceError) -> None:
        self.app = app
        self.limit = limit
        self.counted = counted
        self.refusal = refusal
        self.active = 0
        self._idle: asyncio.Event | None = None  # made by idle() only: nothing per request until then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.counted(scope):
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await send_error(send, self.refusal)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            if not self.active and self._idle is not None:
                self._idle.set()

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for no counted request to be in progress; whether none is."""
        if not self.active:
            return True
        self._idle = asyncio.Event()
        return await event_within(self._idle, timeout)

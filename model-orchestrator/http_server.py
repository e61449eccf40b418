"""How the orchestrator's public port is served: uvicorn options and per-client bounds.

* ``HeaderDeadline``: uvicorn's HTTP protocol (httptools when installed, as uvicorn
  itself picks, else h11) plus a deadline and a size bound for request headers.
  uvicorn alone keeps a connection that never completes its headers open forever: idle
  ones have no timer before their first request, and every byte resets the keep-alive
  timer. A few hundred such clients (slowloris) would hold the server's connection slots.
  httptools buffers unfinished headers without bound, h11 up to
  ``h11_max_incomplete_event_size``; the protocol stops both at MAX_HEADER_BYTES.
* ``server_options(limits)``: the ``uvicorn.run`` keyword arguments for ``settings.limits``.
* ``RequestCap``: at most ``max_requests`` requests in progress across all models; more
  get 503 + Retry-After in the OpenAI envelope.
* ``CanonicalPath``: the request's path decoded once into the one form every later layer
  reads and the proxy sends on (model_orchestrator.paths), or a 400 before anything reads it.
* ``AccessGate``: every request checked against its route's scope (the policy is
  model_orchestrator.auth) before any work is done for it.

h11 is pure Python: on the proxy benchmark it costs about half as much CPU per request
again as httptools, so httptools stays the default where it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from core.common.asgi import ASGIApp, Receive, Scope, Send, send_error
from core.common.errors import ServiceError
from core.common.in_flight import InFlightCap
from core.config.schema import Limits
from model_orchestrator import auth
from model_orchestrator.paths import canonical_path

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024  # request line + headers; h11's default is 16 KiB, nginx's 4 x 8 KiB

# Both uvicorn protocols share this interface (cycle, loop, transport, send_400_response, ...);
# mypy checks the mixin against H11Protocol's.
if TYPE_CHECKING:
    _Protocol = H11Protocol
else:
    _Protocol = object


class HeaderDeadline(_Protocol):
    """Closes a connection that has not sent complete request headers ``header_timeout``
    seconds after connecting, or after its previous response finished (keep-alive), and
    answers 400 to headers past ``max_header_bytes`` (an answered request's unread body
    counts too: past the bound the connection is closed rather than drained).

    A request in progress is never cut: uvicorn starts a new request cycle when headers
    are complete, so the deadline only acts while the cycle it was armed with is still
    current and finished (or there is none yet).
    """

    header_timeout = 10.0
    max_header_bytes = MAX_HEADER_BYTES
    _header_timer: asyncio.TimerHandle | None = None
    _armed_cycle: RequestResponseCycle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        self._header_bytes += len(data)
        super().data_received(data)
        if self._header_bytes > self.max_header_bytes and self._awaiting_headers():
            self._refuse_oversized()

    def on_response_complete(self) -> None:
        self._arm_header_deadline()  # before super(): it may start a pipelined request
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._armed_cycle, self._header_bytes = self.cycle, 0
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _awaiting_headers(self) -> bool:
        cycle: RequestResponseCycle | None = self.cycle  # None until the first request's headers
        return (cycle is self._armed_cycle and (cycle is None or cycle.response_complete)
                and not self.transport.is_closing())

    def _refuse_oversized(self) -> None:
        cycle: RequestResponseCycle | None = self.cycle
        if cycle is None or not cycle.more_body:  # the bytes are a request's headers: say so
            # h11 refuses to answer a request it has not parsed; it has its own bound (and 400) anyway
            with contextlib.suppress(h11.LocalProtocolError):
                self.send_400_response("Request headers too large.")
        # else: the unread rest of an answered request's body; nothing to say, just stop reading it
        self.transport.close()

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._awaiting_headers():
            # debug, not info: under a slowloris attack this would be a line per connection
            log.debug("%s: no complete request headers within %gs; closing", self.client, self.header_timeout)
            self.transport.close()


class H11HeaderDeadline(HeaderDeadline, H11Protocol):
    pass


def header_deadline_protocol(seconds: float, implementation: str = "auto") -> type[HeaderDeadline]:
    """The protocol class for uvicorn's ``http=``, bound to ``seconds`` (uvicorn takes a
    class, not a factory). ``implementation``: "auto" (httptools if installed), "h11" or "httptools"."""
    if implementation == "auto":
        implementation = "httptools" if importlib.util.find_spec("httptools") else "h11"
    base: type[HeaderDeadline] = H11HeaderDeadline
    if implementation == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = type("HttpToolsHeaderDeadline", (HeaderDeadline, HttpToolsProtocol), {})
    return type(base.__name__, (base,), {"header_timeout": seconds})


def server_options(limits: Limits, implementation: str = "auto") -> dict[str, Any]:
    """``uvicorn.run``/``uvicorn.Config`` keyword arguments that enforce ``limits``."""
    return {
        "http": header_deadline_protocol(limits.header_timeout, implementation),
        "timeout_keep_alive": limits.keep_alive_timeout,
        "limit_concurrency": limits.max_connections,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


class RequestCap(InFlightCap):
    """ASGI middleware: at most ``max_requests`` HTTP requests in progress (streams count
    until they end). Lifespan, websockets and ``/health`` pass through uncounted, so
    probes keep answering under load."""

    def __init__(self, app: ASGIApp, max_requests: int) -> None:
        super().__init__(app, max_requests, _counted, _overloaded(max_requests))

    def resize(self, max_requests: int) -> None:
        """A new bound from the next request on (a reload of settings.limits.max_requests)."""
        self.limit, self.refusal = max_requests, _overloaded(max_requests)


def _overloaded(max_requests: int) -> ServiceError:
    return ServiceError(503, f"The server is handling {max_requests} requests (max_requests); retry shortly.",
                        "overloaded", retry_after=1)


def _counted(scope: Scope) -> bool:
    return bool(scope["type"] == "http" and scope["path"] != "/health")


class AccessGate:
    """ASGI middleware: a request its route's scope does not allow is answered here (401/403
    in the OpenAI envelope; admin routes also refuse cross-site requests). Websockets, which
    no route takes, are dropped before any work when keys are configured."""

    def __init__(self, app: ASGIApp, keys: auth.Keys, loopback_bind: bool) -> None:
        self.app = app
        self.keys = keys
        self._loopback_bind = loopback_bind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await send_error(send, refusal)
                return
        elif scope["type"] == "websocket" and self.keys.configured:
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> ServiceError | None:
        needed = auth.route_access(scope["method"], scope["path"])
        refusal = auth.check_access(self.keys, needed, scope["headers"])
        if refusal is None and needed in (auth.Access.ADMIN, auth.Access.FLEET):
            refusal = auth.cross_site_problem(scope["headers"], self._loopback_bind)
        return refusal


class CanonicalPath:
    """ASGI middleware: ``scope["path"]`` becomes the request's canonical path (paths.canonical_path),
    and a path that has none is answered 400 here, before the access policy or the routing read it.
    So the scope a route is checked against is the path its service is sent, byte for byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            try:
                path = canonical_path(scope.get("raw_path") or scope["path"].encode())
            except ServiceError as exc:
                if scope["type"] == "http":
                    await send_error(send, exc)
                return  # a websocket closes unaccepted
            if path != scope["path"]:
                scope = {**scope, "path": path}
        await self.app(scope, receive, send)

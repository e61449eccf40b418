"""The data path: forward a request to its model's service and stream the answer back.

Kept deliberately lean (it is benchmarked against direct access and nginx): raw ASGI
instead of a framework, one pooled aiohttp session, the body read once and parsed
only for ``model``, response chunks passed on as they arrive without re-parsing.

Client bounds (``settings.limits``): bodies up to json_body_mb (upload routes and
/upstream: upload_body_mb), refused at once from Content-Length or counted as they
arrive (413), and in full within body_timeout (408); both close the connection. JSON
nests at most json_max_depth levels (400); bodies over 64 KiB are parsed in a helper
process (json_worker), so a hostile one cannot stall the event loop.

Failure mapping: any failure before the upstream answers → 502 (refused, reset, not
HTTP), silent past ``request_timeout`` → 504, died mid-stream → an SSE error event for
event streams, or an aborted connection for other bodies (never a silently truncated
200). A client that disconnects cancels the upstream request. Timeouts and answers are
reported to the service (``upstream_timed_out``/``upstream_answered``: hang detection).

Headers: hop-by-hop ones (the fixed set and any named in ``Connection:``) stay on their
side; the client's credentials never reach a service, which gets the per-run service
token as ``Authorization`` instead; no header the client did not send is added.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp

from core.asgi import ClientGone, DisconnectWatcher, Receive, Scope, Send, content_length, read_body, send_error
from core.config import Limits, ModelSpec
from core.errors import ServiceError, error_body
from core.service_manager import ManagedService
from model_orchestrator.coordinator import Coordinator
from model_orchestrator.json_worker import INLINE_MAX, BodyProblem, JsonWorker
from model_orchestrator.refusals import Refused, http_error
from model_orchestrator.routing import (
    ModelIndex,
    body_limit,
    parse_model,
    problem_error,
    split_upstream_path,
    upstream_body,
)

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the client library recomputes, plus the
# client's credentials: the upstream gets the service token instead (core/child_env.py).
_DROP_REQUEST = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer trailers "
    b"transfer-encoding upgrade host content-length expect authorization cookie".split()
)
_DROP_RESPONSE = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer trailers "
    b"transfer-encoding upgrade date server".split()
)
# Headers aiohttp would invent; the upstream sees only what the client sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_NO_BUFFERING = (b"x-accel-buffering", b"no")  # tells nginx in front of us not to buffer SSE
_WATCH_AFTER = 0.05  # seconds before a client is watched for a disconnect: short requests never pay for it


class Proxy:
    def __init__(self, coordinator: Coordinator, index: ModelIndex, *, limits: Limits | None = None) -> None:
        self.coordinator = coordinator
        self.index = index
        self.limits = limits or Limits()
        self._renames = index.renames()
        self._json = JsonWorker()
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=False)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=_NO_AUTO_HEADERS, trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._json.close()

    # -- entry points --------------------------------------------------------------

    async def openai_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/...: the body's ``model`` (or the endpoint's default) picks the service."""
        try:
            body = await self._read_body(scope, receive)
            spec, body = await self._route_json(scope["path"], body)
        except ServiceError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        await self.forward(spec, scope, receive, send, body, scope["path"])

    async def upstream_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """/upstream/<model>/<path>: any method, passed through to the model's own API."""
        try:
            spec, path = split_upstream_path(scope["path"], self.index)
            body = await self._read_body(scope, receive)
        except ServiceError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        await self.forward(spec, scope, receive, send, body, path)

    async def forward(
        self, spec: ModelSpec, scope: Scope, receive: Receive, send: Send, body: bytes, path: str
    ) -> None:
        watcher = DisconnectWatcher(receive, watch_after=_WATCH_AFTER)
        error: ServiceError | None = None
        try:
            async with self.coordinator.lease(spec.name) as svc:
                await self._exchange(svc, spec, scope, send, body, path, watcher)
        except Refused as refused:  # the coordinator's domain reason, mapped to HTTP here at the edge
            error = http_error(refused)
        except ServiceError as exc:
            error = exc
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            log.info("%s: client disconnected; upstream request cancelled", spec.name)
        finally:
            watcher.stop()
        if error is not None and not watcher.fired:  # sent once the watch is over: a disconnect cancels nothing
            await send_error(send, error)

    # -- the request body -------------------------------------------------------------

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        headers = scope["headers"]
        return await read_body(receive, body_limit(scope["path"], headers, self.limits),
                               self.limits.body_timeout, content_length(headers))

    async def _route_json(self, path: str, body: bytes) -> tuple[ModelSpec, bytes]:
        """(the model's spec, the body to send it). Large bodies are parsed in the JSON worker
        process, so a hostile one cannot stall the event loop (see json_worker)."""
        if len(body) <= INLINE_MAX:
            requested, data = parse_model(body, self.limits.json_max_depth)
            spec = self.index.resolve(requested, path)
            return spec, upstream_body(body, requested, data, spec)
        try:
            requested, renamed = await self._json.inspect(body, self.limits.json_max_depth, self._renames)
        except BodyProblem as exc:
            raise problem_error(exc) from None
        return self.index.resolve(requested, path), renamed or body

    # -- the exchange ----------------------------------------------------------------

    async def _exchange(
        self, svc: ManagedService, spec: ModelSpec, scope: Scope, send: Send, body: bytes, path: str,
        watcher: DisconnectWatcher,
    ) -> None:
        assert self._session is not None, "Proxy.open() was not called"
        query = scope.get("query_string", b"")
        url = spec.base_url() + path + ("?" + query.decode("latin-1") if query else "")
        timeout = self._timeouts.get(spec.name)
        if timeout is None:
            timeout = self._timeouts[spec.name] = aiohttp.ClientTimeout(
                total=None, connect=10, sock_connect=10, sock_read=spec.request_timeout)
        try:
            upstream = await self._session.request(
                scope["method"], url, data=body or None, timeout=timeout, allow_redirects=False,
                headers=_request_headers(scope["headers"], svc.service_token),
            )
        except asyncio.TimeoutError:  # before the aiohttp errors: its timeouts are ClientErrors too
            svc.upstream_timed_out()
            raise ServiceError(504, f"Model {spec.name!r} did not answer within {spec.request_timeout:g}s "
                               "(request_timeout).", "upstream_timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # refused, reset, garbage for a status line
            raise _upstream_failed(spec, exc) from None
        svc.upstream_answered()
        async with upstream:
            await self._relay(svc, spec, upstream, send, watcher)

    async def _relay(
        self, svc: ManagedService, spec: ModelSpec, upstream: aiohttp.ClientResponse, send: Send,
        watcher: DisconnectWatcher,
    ) -> None:
        headers = _response_headers(upstream.raw_headers)
        event_stream = upstream.content_type == "text/event-stream"
        if event_stream:
            headers.append(_NO_BUFFERING)
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        try:
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                svc.upstream_timed_out()  # a stream silent for request_timeout: as hung as no answer
            reason = _describe_break(spec, exc)
            log.warning("%s", reason)
            if not event_stream:
                raise ConnectionAbortedError(reason) from None  # abort: the client sees a broken body
            await send({"type": "http.response.body", "body": _sse_error(reason), "more_body": True})
        # Complete from here: a disconnect now (the server reports one once the response is
        # done, too) must not cancel the lease's and the upstream's release that follow.
        watcher.complete()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _request_headers(raw: Iterable[tuple[bytes, bytes]], token: str | None) -> list[tuple[str, str]]:
    drop = _DROP_REQUEST
    for key, value in raw:
        if key == b"connection":  # ASGI servers lower-case request header names
            drop = drop | _connection_options(value)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k not in drop]
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    return headers


def _response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = _DROP_RESPONSE
    for key, value in raw:
        if key.lower() == b"connection":
            drop = drop | _connection_options(value)
    return [(k, v) for k, v in raw if k.lower() not in drop]


def _connection_options(value: bytes) -> frozenset[bytes]:
    """Header names listed in a ``Connection:`` header: hop-by-hop too (RFC 9110 §7.6.1)."""
    return frozenset(token.strip().lower() for token in value.split(b","))


def _upstream_failed(spec: ModelSpec, exc: BaseException) -> ServiceError:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ServiceError(502, f"Model {spec.name!r} is not reachable: {exc}", "upstream_unavailable")
    log.warning("%s: request failed before an answer: %s: %s", spec.name, type(exc).__name__, exc)
    return ServiceError(502, f"Model {spec.name!r} failed before answering: {type(exc).__name__}: {exc}",
                        "upstream_error")


def _describe_break(spec: ModelSpec, exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"Model {spec.name!r} sent nothing for {spec.request_timeout:g}s (request_timeout); stream aborted."
    return f"Model {spec.name!r} broke off the response: {type(exc).__name__}: {exc}"


def _sse_error(reason: str) -> bytes:
    body: dict[str, Any] = error_body(reason, 502, "upstream_error")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


"""The data path: forward a request to its model's service and stream the answer back.

Kept deliberately lean (it is benchmarked against direct access and nginx): raw ASGI
instead of a framework, one pooled aiohttp session, the body read once and parsed
only for ``model``, response chunks passed on as they arrive without re-parsing.

Failure mapping: upstream refused → 502, silent past ``request_timeout`` → 504,
died mid-stream → an SSE error event for event streams, or an aborted connection
for other bodies (never a silently truncated 200). A client that disconnects
cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

import aiohttp

from core.config import ModelSpec
from core.errors import ServiceError, error_body
from model_orchestrator.asgi import ClientGone, Receive, Scope, Send, read_body, send_error
from model_orchestrator.coordinator import Coordinator
from model_orchestrator.routing import ModelIndex, parse_model, split_upstream_path, upstream_body

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the client library recomputes.
_DROP_REQUEST = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer trailers "
    b"transfer-encoding upgrade host content-length expect".split()
)
_DROP_RESPONSE = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer trailers "
    b"transfer-encoding upgrade date server".split()
)
_NO_BUFFERING = (b"x-accel-buffering", b"no")  # tells nginx in front of us not to buffer SSE
_UPSTREAM_DOWN = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)
_WATCH_AFTER = 0.05  # seconds before a request's client starts being watched for a disconnect


class Proxy:
    def __init__(self, coordinator: Coordinator, index: ModelIndex) -> None:
        self.coordinator = coordinator
        self.index = index
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=False)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",), trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- entry points --------------------------------------------------------------

    async def openai_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/...: the body's ``model`` (or the endpoint's default) picks the service."""
        try:
            body = await read_body(receive)
            requested, data = parse_model(body)
            spec = self.index.resolve(requested, scope["path"])
            body = upstream_body(body, requested, data, spec)
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
            body = await read_body(receive)
        except ServiceError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        await self.forward(spec, scope, receive, send, body, path)

    async def forward(
        self, spec: ModelSpec, scope: Scope, receive: Receive, send: Send, body: bytes, path: str
    ) -> None:
        watcher = _DisconnectWatcher(receive)
        try:
            async with self.coordinator.lease(spec.name):
                await self._exchange(spec, scope, send, body, path)
        except ServiceError as exc:
            await send_error(send, exc)
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            log.info("%s: client disconnected; upstream request cancelled", spec.name)
        finally:
            watcher.stop()

    # -- the exchange ----------------------------------------------------------------

    async def _exchange(self, spec: ModelSpec, scope: Scope, send: Send, body: bytes, path: str) -> None:
        assert self._session is not None, "Proxy.open() was not called"
        query = scope.get("query_string", b"")
        url = spec.base_url() + path + ("?" + query.decode("latin-1") if query else "")
        timeout = self._timeouts.get(spec.name)
        if timeout is None:
            timeout = self._timeouts[spec.name] = aiohttp.ClientTimeout(
                total=None, connect=10, sock_connect=10, sock_read=spec.request_timeout)
        try:
            upstream = await self._session.request(
                scope["method"], url, data=body or None, headers=_request_headers(scope["headers"]),
                timeout=timeout, allow_redirects=False,
            )
        except _UPSTREAM_DOWN as exc:
            raise ServiceError(502, f"Model {spec.name!r} is not reachable: {exc}", "upstream_unavailable") from None
        except asyncio.TimeoutError:
            raise ServiceError(504, f"Model {spec.name!r} did not answer within {spec.request_timeout:g}s "
                               "(request_timeout).", "upstream_timeout") from None
        async with upstream:
            await self._relay(spec, upstream, send)

    async def _relay(self, spec: ModelSpec, upstream: aiohttp.ClientResponse, send: Send) -> None:
        headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in _DROP_RESPONSE]
        event_stream = upstream.content_type == "text/event-stream"
        if event_stream:
            headers.append(_NO_BUFFERING)
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        try:
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            reason = _describe_break(spec, exc)
            log.warning("%s", reason)
            if not event_stream:
                raise ConnectionAbortedError(reason) from None  # abort: the client sees a broken body
            await send({"type": "http.response.body", "body": _sse_error(reason), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _DisconnectWatcher:
    """Cancels the current task if the client disconnects before the response is done.

    The request body has already been read, so the next ASGI ``receive()`` message is
    ``http.disconnect``: the client left (or the response completed, which ``stop()``
    rules out by cancelling the watcher first). Watching costs a task, so it starts only
    once a request has lasted ``_WATCH_AFTER`` seconds: short requests, the bulk at
    high rates, finish before it would matter.
    """

    def __init__(self, receive: Receive) -> None:
        self.fired = False
        self._owner = asyncio.current_task()
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(_WATCH_AFTER, self._start, receive)

    def _start(self, receive: Receive) -> None:
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            continue
        if self._owner is not None:
            self.fired = True
            self._owner.cancel()

    def stop(self) -> None:
        self._owner = None
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


def _request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw if k.lower() not in _DROP_REQUEST]


def _describe_break(spec: ModelSpec, exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"Model {spec.name!r} sent nothing for {spec.request_timeout:g}s (request_timeout); stream aborted."
    return f"Model {spec.name!r} broke off the response: {type(exc).__name__}: {exc}"


def _sse_error(reason: str) -> bytes:
    body: dict[str, Any] = error_body(reason, 502, "upstream_error")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


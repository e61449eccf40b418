"""The data path: forward a request to its model's service and stream the answer back.

Kept deliberately lean (it is benchmarked against direct access and nginx): raw ASGI
instead of a framework, the data path's own pooled HTTP/1.1 client (upstream.py), the
body read once and parsed only for ``model``, the answer passed on as it arrives,
without re-parsing.

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
import time
from collections.abc import Iterable

from core.common.asgi import (
    ClientGone,
    DisconnectWatcher,
    Receive,
    Scope,
    Send,
    content_length,
    header,
    read_body,
    send_error,
)
from core.common.errors import ServiceError, error_body
from core.common.sse import sse_event
from core.config.schema import Limits, ModelSpec, Settings
from core.service_manager import ManagedService
from model_orchestrator.coordinator import Coordinator
from model_orchestrator.json_worker import INLINE_MAX, BodyProblem, JsonWorker
from model_orchestrator.loading import Answer, admit
from model_orchestrator.metrics import Metrics
from model_orchestrator.multipart import is_form
from model_orchestrator.paths import upstream_query, upstream_target
from model_orchestrator.refusals import Refused, http_error
from model_orchestrator.routing import (
    ModelIndex,
    body_limit,
    parse_form_model,
    parse_model,
    problem_error,
    split_upstream_path,
    upstream_body,
)
from model_orchestrator.stored_responses import candidates, find_holder, not_found, stored_response_id
from model_orchestrator.upstream import (
    ConnectFailed,
    Connection,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    request_head,
    request_start,
)

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop headers, plus those the client library recomputes, plus the
# client's credentials: the upstream gets the service token instead (core/supervision/child_env.py).
_DROP_REQUEST = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer trailers "
    b"transfer-encoding upgrade host content-length expect authorization x-api-key cookie".split()
)
_DROP_RESPONSE = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer trailers "
    b"transfer-encoding upgrade date server".split()
)
_NO_BUFFERING = (b"x-accel-buffering", b"no")  # tells nginx in front of us not to buffer SSE
_WATCH_AFTER = 0.05  # seconds before a client is watched for a disconnect: short requests never pay for it
_ERROR_BODY_MAX = 1 << 20  # bytes of an upstream error read to turn it into an SSE error event
_START_CACHE_MAX = 1024  # request lines kept (model, method, path)


class Proxy:
    def __init__(self, coordinator: Coordinator, index: ModelIndex, *, limits: Limits | None = None,
                 metrics: Metrics | None = None, keep_alive: float | None = None) -> None:
        self.coordinator = coordinator
        self.index = index
        self.limits = limits or Limits()
        self.metrics = metrics
        self.keep_alive = keep_alive  # seconds between loading comments to a waiting stream (loading.py)
        self._renames = index.renames()
        self._json = JsonWorker()
        self._pool = UpstreamPool()
        self._starts: dict[tuple[str, str, str], bytes] = {}  # request line and Host

    def use(self, index: ModelIndex, settings: Settings) -> None:
        """Route by ``index`` and bound by ``settings`` from the next request on (a reload)."""
        self.index, self._renames = index, index.renames()
        self.limits, self.keep_alive = settings.limits, settings.stream_keep_alive or None
        self._starts.clear()  # a port or host may have changed

    async def close(self) -> None:
        self._pool.close()
        await self._json.close()

    # -- entry points --------------------------------------------------------------

    async def openai_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/...: the body's ``model`` (or the endpoint's default) picks the service: a JSON body's, or
        a form's field (a multipart body starts with its boundary, "--": JSON never does)."""
        began = time.monotonic()
        try:
            body = await self._read_body(scope, receive)
            if body[:2] == b"--" and is_form(content_type := header(scope["headers"], b"content-type")):
                requested, stream = parse_form_model(body, content_type or b"")  # an upload: forwarded unchanged
                spec = self.index.resolve(requested, scope["path"])
            else:
                spec, body, stream = await self._route_json(scope["path"], body)
        except ServiceError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        await self.forward(spec, scope, receive, send, body, scope["path"], stream, began)

    async def upstream_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """/upstream/<model>/<path>: any method, passed through to the model's own API."""
        began = time.monotonic()
        try:
            spec, path = split_upstream_path(scope["path"], self.index)
            body = await self._read_body(scope, receive)
        except ServiceError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        await self.forward(spec, scope, receive, send, body, path, False, began)

    async def stored_response_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: to the running model that holds the
        response (stored_responses.py); any other request under /v1/responses/ is refused here."""
        began = time.monotonic()
        response_id = stored_response_id(scope["method"], scope["path"])
        try:
            if response_id is None:
                raise ServiceError(404, f"No route {scope['method']} {scope['path']}: a stored response is read with "
                                   "GET /v1/responses/{id} and cancelled with POST /v1/responses/{id}/cancel.",
                                   "route_not_found")
            await self._read_body(scope, receive)  # nothing is expected: read so the connection stays usable
            asked = candidates(self.coordinator.manager.services.values())
            holder = await find_holder(self._pool, asked, response_id)
            if holder is None:
                raise not_found(response_id, asked)
        except ServiceError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return
        stream = b"stream=true" in scope.get("query_string", b"").lower()
        await self.forward(holder.spec, scope, receive, send, b"", scope["path"], stream, began)

    async def forward(self, spec: ModelSpec, scope: Scope, receive: Receive, send: Send, body: bytes, path: str,
                      stream: bool = False, began: float | None = None) -> None:
        """Lease the model (keeping a waiting stream connected), exchange, answer; record it."""
        began = time.monotonic() if began is None else began
        watcher = DisconnectWatcher(receive, watch_after=_WATCH_AFTER)
        answer = Answer()
        error: ServiceError | None = None
        try:
            svc = await admit(self.coordinator, spec.name, send, answer, self.keep_alive if stream else None)
            try:
                await self._exchange(svc, spec, scope, send, body, path, watcher, answer)
            finally:
                self.coordinator.release(svc)
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
            await _send_error(send, error, answer)
        if self.metrics is not None:
            status = 499 if watcher.fired else error.status if error is not None else answer.status
            self.metrics.request_done(spec.name, path, status, answer.stream, began, answer.first_byte, answer.tail,
                                      answer.waited)

    # -- the request body -------------------------------------------------------------

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        headers = scope["headers"]
        return await read_body(receive, body_limit(scope["path"], headers, self.limits),
                               self.limits.body_timeout, content_length(headers))

    async def _route_json(self, path: str, body: bytes) -> tuple[ModelSpec, bytes, bool]:
        """(the model's spec, the body to send it, whether it asks for a stream). Large bodies are
        parsed in the JSON worker process, so a hostile one cannot stall the event loop (see
        json_worker); those are never streamed chat requests, so they get no loading comments."""
        if len(body) <= INLINE_MAX:
            requested, data = parse_model(body, self.limits.json_max_depth)
            spec = self.index.resolve(requested, path)
            return spec, upstream_body(body, requested, data, spec), data.get("stream") is True
        try:
            requested, renamed = await self._json.inspect(body, self.limits.json_max_depth, self._renames)
        except BodyProblem as exc:
            raise problem_error(exc) from None
        return self.index.resolve(requested, path), renamed or body, False

    # -- the exchange ----------------------------------------------------------------

    def _start(self, spec: ModelSpec, method: str, path: str, query: bytes) -> bytes:
        """The request line and Host header for a canonical ``path`` (paths.py), sent as it is: the service
        gets the path that was checked. Cached without a query: a few routes carry almost every request."""
        if query:
            target = upstream_target(path) + "?" + upstream_query(query)
            return request_start(method.encode("ascii"), target.encode("ascii"), spec.host, spec.port)
        key = (spec.name, method, path)
        start = self._starts.get(key)
        if start is None:
            if len(self._starts) >= _START_CACHE_MAX:  # client-chosen paths must not grow it without bound
                self._starts.clear()
            start = self._starts[key] = request_start(method.encode("ascii"), upstream_target(path).encode("ascii"),
                                                      spec.host, spec.port)
        return start

    async def _exchange(
        self, svc: ManagedService, spec: ModelSpec, scope: Scope, send: Send, body: bytes, path: str,
        watcher: DisconnectWatcher, answer: Answer,
    ) -> None:
        start = self._start(spec, scope["method"], path, scope.get("query_string", b""))
        method = scope["method"].encode("ascii")
        head = request_head(start, method, _request_headers(scope["headers"], svc.service_token), body)
        try:
            upstream = await self._pool.request(spec.host, spec.port, method, head, body, spec.request_timeout)
        except UpstreamTimeout:
            svc.upstream_timed_out()
            raise ServiceError(504, f"Model {spec.name!r} did not answer within {spec.request_timeout:g}s "
                               "(request_timeout).", "upstream_timeout") from None
        except UpstreamError as exc:  # refused, reset, garbage for a status line
            raise _upstream_failed(spec, exc) from None
        svc.upstream_answered()
        try:
            await self._relay(svc, spec, upstream, send, watcher, answer)
        finally:
            self._pool.release(upstream)  # reused only if the answer was read to its end

    async def _relay(
        self, svc: ManagedService, spec: ModelSpec, upstream: Connection, send: Send,
        watcher: DisconnectWatcher, answer: Answer,
    ) -> None:
        event_stream = upstream.content_type() == "text/event-stream"
        if answer.started and not (event_stream and upstream.status == 200):
            await _error_event_from(spec, upstream, send, answer)  # loading comments went out: no status now
            watcher.complete()
            return
        if not answer.started:
            await send({"type": "http.response.start", "status": upstream.status,
                        "headers": _answer_headers(upstream.headers, event_stream, answer)})
            answer.status, answer.stream = upstream.status, event_stream
        try:
            await _pass_on(upstream, send, answer)
        except UpstreamError as exc:
            if isinstance(exc, UpstreamTimeout):
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

async def _pass_on(upstream: Connection, send: Send, answer: Answer) -> None:
    """The answer's body to the client as it arrives; its first byte's time and its last two pieces (a
    final usage event may arrive just before [DONE]) go in ``answer``."""
    before = last = b""
    chunk = await upstream.read()
    answer.first_byte = time.monotonic() if chunk else None
    while chunk:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        before, last = last, chunk
        chunk = await upstream.read()
    answer.tail = before + last


def _answer_headers(raw: Iterable[tuple[bytes, bytes]], event_stream: bool, answer: Answer
                    ) -> list[tuple[bytes, bytes]]:
    """The upstream's headers for the client; with what the wait cost when there was one: seconds
    waited for the model, and whether this request started or restored it."""
    headers = _response_headers(raw)
    if event_stream:
        headers.append(_NO_BUFFERING)
    if answer.waited >= 0.001:
        headers.append((b"x-aio-queue-seconds", f"{answer.waited:.3f}".encode()))
    if answer.ticket.loaded is not None:
        headers.append((b"x-aio-loaded", answer.ticket.loaded.encode()))
    return headers


async def _send_error(send: Send, error: ServiceError, answer: Answer) -> None:
    """The error as an envelope with its status; as an SSE error event once loading comments went out."""
    if not answer.started:
        await send_error(send, error)
        return
    await send({"type": "http.response.body", "body": sse_event(error.body()), "more_body": False})


async def _error_event_from(spec: ModelSpec, upstream: Connection, send: Send, answer: Answer) -> None:
    """An upstream answer that is not a 200 event stream, after loading comments: as an error event
    (one that breaks off while its body is read, too: the client still gets an event, never a bare close)."""
    try:
        raw = await upstream.read_up_to(_ERROR_BODY_MAX)
    except UpstreamError as exc:
        reason = _describe_break(spec, exc)
        log.warning("%s", reason)
        answer.status = 502
        await send({"type": "http.response.body", "body": _sse_error(reason), "more_body": False})
        return
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not (isinstance(body, dict) and "error" in body):
        text = raw.decode("utf-8", "replace")[:300]
        body = error_body(f"The model answered {upstream.status}: {text}", upstream.status, "upstream_error")
    answer.status = upstream.status
    await send({"type": "http.response.body", "body": sse_event(body), "more_body": False})


def _request_headers(raw: Iterable[tuple[bytes, bytes]], token: str | None) -> bytes:
    """The client's headers for the service, formatted for the request head, with the service token."""
    drop = _DROP_REQUEST
    for key, value in raw:
        if key == b"connection":  # ASGI servers lower-case request header names
            drop = drop | _connection_options(value)
    lines = [b"%s: %s\r\n" % (k, v) for k, v in raw if k not in drop]
    if token:
        lines.append(b"Authorization: Bearer %s\r\n" % token.encode("latin-1"))
    head = b"".join(lines)
    # One CR and one LF per line, or a value carried a line break: the ASGI server refuses those
    # already; checked again here, where a header becomes bytes on the service's connection.
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
        raise ServiceError(400, "A request header value contains a line break.", "invalid_header")
    return head


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
    if isinstance(exc, ConnectFailed):
        return ServiceError(502, f"Model {spec.name!r} is not reachable: {exc}", "upstream_unavailable")
    log.warning("%s: request failed before an answer: %s: %s", spec.name, type(exc).__name__, exc)
    return ServiceError(502, f"Model {spec.name!r} failed before answering: {type(exc).__name__}: {exc}",
                        "upstream_error")


def _describe_break(spec: ModelSpec, exc: BaseException) -> str:
    if isinstance(exc, UpstreamTimeout):
        return f"Model {spec.name!r} sent nothing for {spec.request_timeout:g}s (request_timeout); stream aborted."
    return f"Model {spec.name!r} broke off the response: {type(exc).__name__}: {exc}"


def _sse_error(reason: str) -> bytes:
    return sse_event(error_body(reason, 502, "upstream_error"))



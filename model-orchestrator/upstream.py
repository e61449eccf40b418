"""The data path's HTTP/1.1 client: pooled connections to the model services, parsed by httptools.

Why not aiohttp's client: under the benchmark's load it was 43 % of the orchestrator's CPU per
proxied request (bench/RESULTS.md, "Where the orchestrator's CPU goes"): request objects, header
multidicts, a stream reader and a timer re-armed on every read. This client does what the proxy
needs and nothing else:

* Connections are pooled per (host, port) and reused within ``IDLE_MAX`` seconds of their last
  answer's end: under the services' keep-alive (uvicorn's 5 s from the same moment), so a reused
  connection is hardly ever one the service is closing. Should that happen anyway to a request
  whose method is idempotent, before any byte of an answer, it is sent once more on a new
  connection (a POST never is: the service may have acted on it). A connection is reused only
  after an answer that allows it, complete, with nothing after it; one left mid-answer (the
  client left, an error), or that receives bytes while idle, is closed.
* The request goes out in one write, head and body (the body is in memory already).
* The answer is parsed by httptools (llhttp, as uvicorn's server uses): status, raw headers, the
  body with chunked encoding undone. ``read()`` hands over all the body that has arrived in one
  piece, so a stream costs one wake-up per socket read, not one per parser callback.
* ``read_timeout``: seconds without a byte from the service, from the moment the request is
  written (however long a large body takes to drain), before the answer or between two pieces of
  it. One timer per connection, re-armed only when it fires (not on every read), and stopped
  while reading is paused for a slow client.
* Backpressure: reading from the service pauses while more than ``HIGH_WATER`` bytes of its
  answer wait for the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import cast

import httptools

from core.common.aio import within

IDLE_MAX = 4.0  # seconds a pooled connection may idle before reuse; under uvicorn's 5 s keep-alive
HIGH_WATER = 256 * 1024  # bytes of an answer buffered before reading from the service pauses
_JOIN_MAX = 64 * 1024  # bodies up to this size go out in the same write as the head


class UpstreamError(Exception):
    """The service failed: the connection was reset or closed early, or what came back is not HTTP."""


class ConnectFailed(UpstreamError):
    """No connection could be made to the service: refused, unreachable, or not within the connect timeout."""


class UpstreamTimeout(UpstreamError):
    """Nothing came from the service for ``read_timeout`` seconds."""


class _SecondAnswer(Exception):
    """Raised in the parser when a message begins after the answer was complete: stops it there."""


class Connection(asyncio.Protocol):
    """One connection to a service and, while leased, the answer to the one request sent on it."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.closed = False
        self.leased = False
        self.idle_since = 0.0  # loop time the last answer ended
        self.idle_list: list[Connection] | None = None  # the pool's list while it waits there
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._paused = False
        self._begin(b"GET")

    def _begin(self, method: bytes) -> None:
        """Fresh answer state for a request of ``method``."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.silent = True  # no byte has come for this request yet
        self._head_only = method == b"HEAD"  # its answer has no body, whatever its Content-Length says
        self._body: list[bytes] = []
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_alive = False
        self._last_read = self._loop.time()
        self._resume()  # the last answer may have ended with reading paused

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if self.closed:  # given up while connecting (a timeout, a cancel)
            self._transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small answers go out at once

    def data_received(self, data: bytes) -> None:
        if not self.leased:  # nothing was asked: whatever this is, the connection cannot be trusted again
            self.close()
            return
        self._last_read = self._loop.time()
        self.silent = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the service switched protocols, which the proxy does not relay"))
        except httptools.HttpParserError as exc:
            second = isinstance(exc.__context__, _SecondAnswer)  # if so, the answer stands; the connection does not
            self._fail(UpstreamError("the service sent more after its answer" if second else
                                     f"not an HTTP answer ({exc})"))
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_list is not None:
            with contextlib.suppress(ValueError):
                self.idle_list.remove(self)
            self.idle_list = None
        if not self.complete and self._error is None:
            if self.headers_done and not self._length_known():
                self.complete = True  # a body delimited by the end of the connection has ended
            else:
                self._error = UpstreamError(f"the service closed the connection{f' ({exc})' if exc else ''} "
                                            "before its answer was complete")
        self._stop_timer()
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _SecondAnswer

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an informational answer (103 Early Hints): the real one follows
            self.headers = []
            return
        self.status, self.headers_done = status, True
        # Asked now: once the message is complete the parser has reset for the next one and says False.
        self._keep_alive = self._parser.should_keep_alive()
        if self._head_only:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True
            self.idle_since = self._loop.time()  # the service's keep-alive timer starts now too

    # -- the exchange ----------------------------------------------------------------------------

    async def send(self, method: bytes, head: bytes, body: bytes, read_timeout: float) -> None:
        """Send one request (``head`` ends with its blank line) and wait for the answer's status and headers."""
        if self.closed or self._transport is None:
            raise self._error or UpstreamError("the service closed the connection before the request was sent")
        self._begin(method)
        self.leased = True
        try:
            if len(body) <= _JOIN_MAX:
                self._transport.write(head + body if body else head)
            else:
                self._transport.writelines((head, body))
        except RuntimeError as exc:  # uvloop, on a transport closed since the check above
            raise UpstreamError(f"the connection closed as the request was sent ({exc})") from None
        self._read_timeout = read_timeout
        self._timer = self._loop.call_at(self._last_read + read_timeout, self._check_silence)
        while not self.headers_done:
            self._raise_error()
            self._waiter = waiter = self._loop.create_future()  # cleared by _wake
            await waiter

    async def read(self) -> bytes:
        """The body that has arrived since the last read, at least one byte; b"" once the answer is complete."""
        body = self._body
        while not body:
            if self.complete:
                return b""
            self._raise_error()
            self._waiter = waiter = self._loop.create_future()  # cleared by _wake
            await waiter
        chunk = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused:
            self._resume()
        return chunk

    async def read_up_to(self, limit: int) -> bytes:
        """The body up to ``limit`` bytes (fewer if it ends first)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (chunk := await self.read()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), matched without regard to case."""
        return next((value for key, value in self.headers if key.lower() == name), None)

    def content_type(self) -> str:
        """The media type of the answer, lower case, without parameters ("" if none)."""
        value = self.header(b"content-type")
        return value.split(b";", 1)[0].strip().lower().decode("latin-1") if value else ""

    def idle_for(self) -> float:
        """Seconds since the last answer ended."""
        return self._loop.time() - self.idle_since

    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed and self._error is None and not self._head_only

    def finish(self) -> None:
        """The exchange is over: stop its timer; close the connection unless it can carry another request."""
        self.leased = False
        self._stop_timer()
        if not self.reusable():
            self.close()

    def close(self) -> None:
        """At once: what is still unsent is dropped (close() would wait for a service that may never read it)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- internals ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # not cancelled with its reader
                waiter.set_result(None)

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._last_read = self._loop.time()  # silence is counted from here, not from the pause
            self._transport.resume_reading()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed and not self.complete:
            raise UpstreamError("the connection is closed")

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.close()

    def _check_silence(self) -> None:
        """The read timer fired: time out if nothing arrived for read_timeout seconds, else re-arm."""
        self._timer = None
        if self.complete or self._error is not None:
            return
        now = self._loop.time()
        if self._paused:  # waiting for the client, not for the service
            self._last_read = now
        due = self._last_read + self._read_timeout
        if now < due:
            self._timer = self._loop.call_at(due, self._check_silence)
            return
        self._fail(UpstreamTimeout(f"nothing from the service for {self._read_timeout:g}s"))
        self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _length_known(self) -> bool:
        """Whether the answer's length is given (Content-Length, or chunked): if not, its end is the connection's."""
        for key, value in self.headers:
            name = key.lower()
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return False


class UpstreamPool:
    """Keep-alive connections to the services, one request at a time on each."""

    def __init__(self, *, connect_timeout: float = 10.0, idle_max: float = IDLE_MAX) -> None:
        self.connect_timeout = connect_timeout
        self.idle_max = idle_max
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def request(self, host: str, port: int, method: bytes, head: bytes, body: bytes, read_timeout: float,
                      connect_timeout: float | None = None) -> Connection:
        """Send a request (``head``: from ``request_head``) and return the connection once the answer's headers
        are in. The caller reads the body and must ``release`` the connection."""
        key = (host, port)
        conn = self._idle_connection(key)
        if conn is not None:
            try:
                await conn.send(method, head, body, read_timeout)
                return conn
            except UpstreamError as exc:
                conn.close()
                if not (method in _IDEMPOTENT and conn.silent and not isinstance(exc, UpstreamTimeout)):
                    raise
                # closed by the service as the request went out: once more, on a new connection
            except BaseException:
                conn.close()
                raise
        conn = await self._connect(key, connect_timeout or self.connect_timeout)
        try:
            await conn.send(method, head, body, read_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """Back to the pool if the answer was read to its end and the connection may carry another; else closed."""
        conn.finish()
        if not conn.closed:
            conn.idle_list = self._idle.setdefault(conn.key, [])
            conn.idle_list.append(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
        self._idle.clear()

    def _idle_connection(self, key: tuple[str, int]) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the furthest from the service's keep-alive timeout
            conn.idle_list = None
            if not conn.closed and conn.idle_for() < self.idle_max:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int], timeout: float) -> Connection:
        conn = Connection(key)
        try:
            await within(asyncio.get_running_loop().create_connection(lambda: conn, key[0], key[1]), timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]} within {timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from None
        except BaseException:
            conn.close()  # cancelled: a connection made as it was cancelled closes as it is made
            raise
        return conn


_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))  # RFC 9110 9.2.2


def request_start(method: bytes, target: bytes, host: str, port: int) -> bytes:
    """The request line and the Host header (an IPv6 address in brackets)."""
    name = f"[{host}]" if ":" in host else host
    return b"%s %s HTTP/1.1\r\nHost: %s:%d\r\n" % (method, target, name.encode("ascii"), port)


def request_head(start: bytes, method: bytes, headers: bytes, body: bytes) -> bytes:
    """The whole head: ``start`` (request_start), ``headers`` already formatted ("Name: value\\r\\n" each),
    the body's length, the blank line. Content-Length goes with every body, and with every request whose
    method has one."""
    if body or method not in _BODILESS:
        return b"%s%sContent-Length: %d\r\n\r\n" % (start, headers, len(body))
    return b"%s%s\r\n" % (start, headers)


_BODILESS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"))

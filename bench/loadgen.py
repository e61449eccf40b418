"""A lean closed-loop HTTP/1.1 load generator (asyncio Protocol + uvloop), for the benchmarks.

Each of ``concurrency`` keep-alive connections sends a request, waits for the whole
response, and sends the next (on a new connection once the server said ``Connection: close``),
until ``duration`` seconds pass. It understands
Content-Length and chunked bodies, and for SSE it records when each event arrived
against the send time the fake backend stamped into it (``"t": monotonic ns``).
Written against raw sockets so the client costs far less CPU than the servers measured.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

_STAMP = re.compile(rb'"t": ?(\d+)')


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)  # request sent → response complete
    ttfb_ms: list[float] = field(default_factory=list)  # request sent → first body byte
    chunk_delay_ms: list[float] = field(default_factory=list)  # backend stamp → chunk received
    events: int = 0
    errors: int = 0
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies_ms)


class _Response:
    """Incremental parser for one HTTP/1.1 response."""

    def __init__(self, sent_ns: int, track_chunks: bool) -> None:
        self.sent_ns = sent_ns
        self.track_chunks = track_chunks
        self.head = bytearray()
        self.status = 0
        self.length: int | None = None  # Content-Length, or None for chunked
        self.close = False  # the server said "Connection: close": the next request needs a new connection
        self.raw = bytearray()  # undecoded chunked framing
        self.body_seen = 0
        self.first_byte_ns: int | None = None
        self.done = False
        self.delays: list[float] = []
        self.events = 0
        self._tail = b""

    def feed(self, data: bytes, now: int) -> bytes:
        """Consume data; return bytes left over after this response ended."""
        if self.status == 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return b""
            self._parse_head(bytes(self.head[:end]))
            data = bytes(self.head[end + 4:])
        if self.length is not None:
            take = data[: self.length - self.body_seen]
            self._body(take, now)
            self.done = self.body_seen >= self.length
            return data[len(take):]
        return self._chunked(data, now)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.length = int(value.strip())
            elif name == b"connection" and value.strip().lower() == b"close":
                self.close = True

    def _chunked(self, data: bytes, now: int) -> bytes:
        self.raw += data
        while True:
            eol = self.raw.find(b"\r\n")
            if eol < 0:
                return b""
            size = int(self.raw[:eol].split(b";")[0], 16)
            if len(self.raw) < eol + 2 + size + 2:
                return b""
            chunk = bytes(self.raw[eol + 2: eol + 2 + size])
            del self.raw[: eol + 2 + size + 2]
            if size == 0:
                self.done = True
                return bytes(self.raw)
            self._body(chunk, now)

    def _body(self, chunk: bytes, now: int) -> None:
        if not chunk:
            return
        if self.first_byte_ns is None:
            self.first_byte_ns = now
        self.body_seen += len(chunk)
        if self.track_chunks:
            text = self._tail + chunk
            self.events += text.count(b"data: ") - self._tail.count(b"data: ")
            self.delays += [(now - int(t)) / 1e6 for t in _STAMP.findall(chunk)]
            self._tail = chunk[-8:]


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: _Response | None = None
        self.finished: asyncio.Future[_Response] | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None or self.finished is None:
            return
        self.response.feed(data, time.monotonic_ns())
        if self.response.done and not self.finished.done():
            self.finished.set_result(self.response)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_exception(ConnectionError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)

    async def exchange(self, request: bytes, track_chunks: bool) -> _Response:
        assert self.transport is not None
        self.finished = asyncio.get_running_loop().create_future()
        self.response = _Response(time.monotonic_ns(), track_chunks)
        self.transport.write(request)
        return await self.finished


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def run(host: str, port: int, request: bytes, concurrency: int, duration: float,
              track_chunks: bool = False) -> Result:
    """Closed loop: ``concurrency`` connections, each one request at a time, for ``duration`` s."""
    result = Result()
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + duration

    async def worker() -> None:
        _, conn = await loop.create_connection(_Connection, host, port)
        try:
            while time.monotonic() < deadline:
                try:
                    response = await conn.exchange(request, track_chunks)
                except ConnectionError:
                    result.errors += 1
                    _, conn = await loop.create_connection(_Connection, host, port)
                    continue
                _record(result, response)
                if response.close and conn.transport is not None:  # as a real client does (nginx
                    conn.transport.close()  # closes a connection after keepalive_requests)
                    _, conn = await loop.create_connection(_Connection, host, port)
        finally:
            if conn.transport is not None:
                conn.transport.close()

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.monotonic() - began
    return result


def _record(result: Result, response: _Response) -> None:
    if response.status != 200:
        result.errors += 1
        return
    end = time.monotonic_ns()
    result.latencies_ms.append((end - response.sent_ns) / 1e6)
    if response.first_byte_ns is not None:
        result.ttfb_ms.append((response.first_byte_ns - response.sent_ns) / 1e6)
    result.chunk_delay_ms += response.delays
    result.events += response.events

"""The one raw-ASGI toolkit, shared by the model services' middleware and the orchestrator's data path.

* Types: ``Scope``, ``Message``, ``Receive``, ``Send``, ``ASGIApp``.
* The request body: ``read_body`` (a size limit, refused at once from ``content_length``,
  and a deadline), ``ClientGone`` when the client leaves first, ``BodyRefused`` (413/408).
* Error answers: ``send_json``, and ``send_error`` for the OpenAI envelope of a ``ServiceError``.
* ``DisconnectWatcher``: the one rule for disconnects. Once the body has been read, a client
  that disconnects before its response is complete cancels the task serving it.

No framework here: the orchestrator's data path is benchmarked per request and per SSE event.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from core.common.errors import ServiceError, error_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 64 * 1024 * 1024
_CLOSE = (b"connection", b"close")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class BodyRefused(ServiceError):
    """A request body refused before it was read in full (too large, too slow).

    The answer closes the connection: the rest of the body may still be on its way, and
    the server would otherwise read (and discard) all of it to reuse the connection.
    """


# -- the request body ---------------------------------------------------------------------


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as ASGI servers give names), or None."""
    return next((value for key, value in headers if key == name), None)


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    value = header(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES, timeout: float | None = None,
                    declared: int | None = None) -> bytes:
    """The whole request body: 413 past ``limit`` bytes (at once if ``declared``, the
    Content-Length, says so), 408 unless it has all arrived within ``timeout`` seconds;
    ``ClientGone`` if the client disconnects first."""
    if declared is not None and declared > limit:
        raise _too_large(limit)
    if timeout is None:
        return await _read(receive, limit)
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    # A timer handle rather than asyncio.wait_for/timeout: no extra task, and 3.10 has no timeout().
    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await _read(receive, limit)
    except asyncio.CancelledError:
        if not expired:
            raise
        if sys.version_info >= (3, 11):
            task.uncancel()
        raise BodyRefused(408, f"The request body did not arrive within {timeout:g}s (body_timeout).",
                          "body_timeout") from None
    finally:
        timer.cancel()


async def _read(receive: Receive, limit: int) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if message["type"] == "http.request" and not message.get("more_body", False) and len(body) <= limit:
        return body  # the common case: the whole body in one message
    # One growing buffer, not a list of chunks: its memory goes back to the OS when it is
    # freed (a large realloc is an mmap), where thousands of 64 KiB chunks would leave the
    # heap fragmented and the process's RSS high after a burst of large uploads.
    buffer = bytearray()
    while True:
        if message["type"] == "http.disconnect":
            raise ClientGone
        buffer += message.get("body", b"")
        if len(buffer) > limit:
            raise _too_large(limit)
        if not message.get("more_body", False):
            return bytes(buffer)
        message = await receive()


def _too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"Request body larger than {limit / (1024 * 1024):g} MiB.", "body_too_large")


# -- error answers ----------------------------------------------------------------------------


async def send_json(send: Send, status: int, body: bytes, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, exc: ServiceError, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """``exc`` as an OpenAI error envelope, with its own headers (Retry-After) and ``extra``."""
    headers = [(k.encode(), v.encode()) for k, v in exc.headers().items()]
    headers.extend(extra)
    if isinstance(exc, BodyRefused):
        headers.append(_CLOSE)
    await send_json(send, exc.status, error_bytes(exc.message, exc.status, exc.code, exc.param), headers)


# -- disconnects ---------------------------------------------------------------------------------


class DisconnectWatcher:
    """Cancels the task that creates it if its client disconnects before the response is complete.

    Create it once the request body has been read in full: from then on the only message
    ``receive`` has to give is ``http.disconnect``, which the server sends when the client
    leaves and also once the response is complete. ``complete()`` (called just before the
    last body message is sent, or by ``tracking(send)``) rules out the second case, so a
    disconnect that coincides with the end of the response cancels nothing. ``stop()``
    ends the watch; call it in a ``finally``.

    ``watch_after``: seconds before watching begins. Watching costs a task; a request over
    sooner never pays for it (the proxy's short requests, the bulk at high rates), and a
    client that leaves in that time is noticed once it has passed.
    """

    __slots__ = ("_event", "_owner", "_receive", "_task", "_timer", "fired", "gone")

    def __init__(self, receive: Receive, *, watch_after: float = 0.0) -> None:
        self.fired = False  # it cancelled its task
        self.gone = False  # the client disconnected (before or after the response was complete)
        self._owner = asyncio.current_task()
        self._receive = receive
        self._task: asyncio.Future[None] | None = None
        self._event: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        if watch_after > 0:
            self._timer = asyncio.get_running_loop().call_later(watch_after, self._start)
        else:
            self._start()

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            continue
        self.gone = True
        if self._event is not None:
            self._event.set()
        if self._owner is not None:
            self.fired = True
            self._owner.cancel()

    def complete(self) -> None:
        """The response is complete (or about to be): a disconnect from now on cancels nothing."""
        self._owner = None

    def stop(self) -> None:
        self._owner = None
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    async def disconnected(self) -> None:
        """Returns once the client has disconnected: for an app that listens for it itself."""
        if self.gone:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def tracking(self, send: Send) -> Send:
        """``send`` that calls ``complete()`` as the last body message goes out."""

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.complete()
            await send(message)

        return tracked

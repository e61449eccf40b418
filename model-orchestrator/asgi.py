"""Minimal ASGI helpers for the raw data path (no framework on the hot path)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from core.errors import ServiceError, error_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 64 * 1024 * 1024
_CLOSE = (b"connection", b"close")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class BodyRefused(ServiceError):
    """A request body refused before it was read in full (too large, too slow).

    The answer closes the connection: the rest of the body may still be on its way, and
    the server would otherwise read (and discard) all of it to reuse the connection.
    """


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES, timeout: float | None = None,
                    declared: int | None = None) -> bytes:
    """The whole request body: 413 past ``limit`` bytes (at once if ``declared``, the
    Content-Length, says so), 408 unless it has all arrived within ``timeout`` seconds."""
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


async def send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, exc: ServiceError) -> None:
    extra = [(k.encode(), v.encode()) for k, v in exc.headers().items()]
    if isinstance(exc, BodyRefused):
        extra.append(_CLOSE)
    await send_json(send, exc.status, error_bytes(exc.message, exc.status, exc.code, exc.param), extra)

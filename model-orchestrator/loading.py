"""Keeping a streaming client connected while its model loads: SSE comments until admission.

A first request for a cold 7B model can wait a minute or more, and proxies in front of a pod
(RunPod's drops a request after ~100 s of silence) and client libraries give up on a silent
connection. So when a request that asked for a stream (``"stream": true``) cannot be served at
once, the orchestrator admits it in a task and, every ``interval`` seconds until then, sends
an SSE comment (``: loading qwen 12s``), which every SSE parser ignores. The first comment
commits the response (200, ``text/event-stream``); the model's own events follow unchanged,
and a failure after that point arrives as an error event instead of a status code.

A request that is served within ``interval`` sees nothing of this: no early headers, no comments.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from core.common.asgi import Send
from core.service_manager import ManagedService
from model_orchestrator.coordinator import Coordinator, Ticket

STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class Answer:
    """What the proxy sent for one request (for the response's own headers and the metrics)."""

    status: int = 0
    stream: bool = False
    started: bool = False  # the response's status and headers have been sent
    first_byte: float | None = None
    tail: bytes = b""  # the answer's last chunk (a final usage object, if any)
    waited: float = 0.0  # seconds the request waited for its model
    ticket: Ticket = field(default_factory=Ticket)


async def admit(coordinator: Coordinator, name: str, send: Send, answer: Answer, keep_alive: float | None
                ) -> ManagedService:
    """``coordinator.acquire(name)`` (the caller releases); with ``keep_alive``, SSE comments meanwhile.
    A plain function, not a context manager: this runs for every request on the data path."""
    began = time.monotonic()
    if keep_alive is None or coordinator.servable_now(name):
        svc = await coordinator.acquire(name, answer.ticket)
    else:
        svc = await _acquire_with_comments(coordinator, name, send, answer, keep_alive, began)
    answer.waited = time.monotonic() - began
    return svc


async def _acquire_with_comments(coordinator: Coordinator, name: str, send: Send, answer: Answer,
                                 interval: float, began: float) -> ManagedService:
    task = asyncio.ensure_future(coordinator.acquire(name, answer.ticket))
    try:
        while not (await asyncio.wait({task}, timeout=interval))[0]:
            if not answer.started:
                await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
                answer.started, answer.status, answer.stream = True, 200, True
            comment = f": loading {name} {time.monotonic() - began:.0f}s\n\n".encode()
            await send({"type": "http.response.body", "body": comment, "more_body": True})
        return task.result()
    except BaseException:
        await _abandon(coordinator, task)
        raise


async def _abandon(coordinator: Coordinator, task: asyncio.Future[ManagedService]) -> None:
    """Give up an admission: cancel it, and release the lease should it have been granted meanwhile."""
    task.cancel()
    with contextlib.suppress(BaseException):
        coordinator.release(await asyncio.shield(task))

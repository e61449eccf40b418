"""asyncio helpers for lifecycle code that must neither lose a cancellation nor pass one on.

Two hazards shape them. ``asyncio.wait_for`` before Python 3.12 may swallow the caller's
cancellation when the awaited call completes at the same moment: for a start that a stop
is cancelling, "stop" would turn into "READY". And awaiting a task directly, or through
``gather``, cancels that task when the waiter is cancelled: a client hanging up would cut
a stop short and leave its process running. ``asyncio.wait`` does neither, so it is used
instead of both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_all(aws: Iterable[Awaitable[object]]) -> None:
    """Wait until every one of ``aws`` has ended, however it ended.

    Unlike ``gather``, being cancelled does not cancel them: they are typically other
    services' stops, which must run to their end.
    """
    futures = {asyncio.ensure_future(aw) for aw in aws}
    for future in futures:
        future.add_done_callback(retrieve_exception)
    if futures:
        await asyncio.wait(futures)


def joined(task: asyncio.Future[T]) -> asyncio.Future[T]:
    """A future of ``task``'s end; cancelling it (a waiter giving up) leaves the task running."""
    outer = asyncio.shield(task)
    outer.add_done_callback(retrieve_exception)  # a caller may drop it: no "never retrieved" noise
    return outer


def retrieve_exception(future: asyncio.Future[Any]) -> None:
    """Done-callback marking the exception as seen (it is reported through state and waiters)."""
    if not future.cancelled():
        future.exception()


def done_future() -> asyncio.Future[None]:
    """A future that has already ended, for "nothing to wait for"."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``aw``'s result, or ``asyncio.TimeoutError`` after ``timeout`` seconds (``aw`` is then cancelled).

    ``asyncio.wait_for`` without its hazard: a cancellation of the caller always propagates
    (``aw`` is cancelled with it), even when ``aw`` completes at the same moment.
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(retrieve_exception)
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})  # let it unwind (e.g. an HTTP request closing its connection)
        if not task.cancelled():
            task.exception()  # it ended some other way as it was timed out: the timeout stands
        raise asyncio.TimeoutError
    return task.result()


async def event_within(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; whether it is set. (``within`` for the common case.)"""
    if event.is_set():
        return True
    try:
        await within(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True

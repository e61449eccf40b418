"""Blocking model work off the event loop: one job at a time, cancellable, streamable.

A model service owns one ``Worker``. Every forward pass (a render, a generation, an
embedding batch) runs as a job on its single thread, so jobs never overlap: the
pipelines are not thread-safe, and one GPU job at a time is what the memory share
was sized for.

Cancellation is cooperative. When the awaiting task is cancelled (core/runtime/middleware.py's
``CancelOnDisconnect`` cancels the handler of a client that hung up), the job's ``JobContext`` is marked
cancelled; the job function polls it (a diffusers step callback, a transformers
StoppingCriteria) and stops by calling ``ctx.check()``, which raises ``JobCancelled``.
The thread stays busy until the function has returned, so the next job cannot start
on top of a cancelled one that is still computing; a job still queued is dropped
without running. Unlike an ``asyncio.Lock`` around ``asyncio.to_thread``, this keeps
serialising even when the awaiting side has already gone.

Streaming jobs push items (tokens) with ``ctx.emit(item)``; the consumer iterates
``Worker.stream(...)``, and stopping the iteration cancels the job.

Every job logs "<name>: job N (label) started", and "... finished in X s",
"... cancelled after X s", "... failed after X s" or "... dropped before it started",
from the worker thread itself: for one worker the lines are in the order the jobs ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Concatenate, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
# A job function takes the JobContext first, then the arguments given to run() or stream().
JobFunction = Callable[Concatenate["JobContext", ...], T]
_END = object()  # closes a stream's queue once the job has ended


class JobCancelled(Exception):
    """Raised by ``JobContext.check()`` in the thread; the job stopped early on purpose."""


class WorkerClosed(RuntimeError):
    """The worker was closed before (or while) the job ran."""


class JobContext:
    """What the job function sees: whether to stop, and (streaming jobs) where to push items."""

    def __init__(self, job_id: int, label: str, sink: Callable[[Any], None] | None = None) -> None:
        self.id, self.label = job_id, label
        self._cancelled = threading.Event()
        self._sink = sink
        self.closing = False  # cancelled by Worker.close(), not by the caller

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is cancelled (True) or ``timeout`` seconds pass (False)."""
        return self._cancelled.wait(timeout)

    def check(self) -> None:
        """Raise ``JobCancelled`` if the job should stop; call it where stopping is safe."""
        if self._cancelled.is_set():
            raise JobCancelled(f"job {self.id} cancelled")

    def emit(self, item: Any) -> None:
        """Push one item to the stream's consumer (thread-safe; dropped once cancelled)."""
        if self._sink is None:
            raise TypeError("emit() is for jobs started with Worker.stream()")
        if not self._cancelled.is_set():
            self._sink(item)


class _Job:
    """A submitted job: the context the thread sees, and the loop-side future of its result."""

    def __init__(self, ctx: JobContext, fn: JobFunction[Any], args: tuple[Any, ...]) -> None:
        self.ctx, self.fn, self.args = ctx, fn, args
        self.loop = asyncio.get_running_loop()
        self.result: asyncio.Future[Any] = self.loop.create_future()
        self.thread_future: Future[None] | None = None

    def settle(self, outcome: Callable[[asyncio.Future[Any]], None]) -> None:
        """Hand the outcome to the loop (from the thread); nothing if the caller has gone."""
        def apply() -> None:
            if not self.result.done():
                outcome(self.result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(apply)


class Worker:
    """One thread running one job at a time; see the module docstring."""

    def __init__(self, name: str, after_job: Callable[[], None] | None = None) -> None:
        self.name = name
        self._after_job = after_job  # in the thread after every job, e.g. give cached GPU memory back
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-worker")
        self._ids = itertools.count(1)
        self._jobs: set[_Job] = set()  # queued or running
        self._closed = False

    async def run(self, fn: JobFunction[T], *args: Any, label: str = "") -> T:
        """``fn(ctx, *args)`` on the worker thread; cancelling the caller cancels the job."""
        job = self._submit(fn, args, label, sink=None)
        try:
            return await job.result  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    async def stream(self, fn: JobFunction[Any], *args: Any, label: str = "") -> AsyncGenerator[Any, None]:
        """Items that ``fn(ctx, *args)`` emits, then its exception if it failed.

        Leaving the iteration early (break, an exception, cancellation, ``aclose()``)
        cancels the job.
        """
        items: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is reading
                loop.call_soon_threadsafe(items.put_nowait, item)

        job = self._submit(fn, args, label, sink)
        # Settled through call_soon_threadsafe after every emitted item: _END comes last.
        job.result.add_done_callback(lambda _: items.put_nowait(_END))
        try:
            while (item := await items.get()) is not _END:
                yield item
            await job.result
        finally:
            self._cancel(job)  # a no-op once the job has ended

    async def close(self) -> None:
        """Drop queued jobs, stop the running one, and wait for the thread to finish it."""
        self._closed = True
        for job in list(self._jobs):
            job.ctx.closing = True
            job.ctx.cancel()
            if job.thread_future is not None and job.thread_future.cancel():  # never started
                self._drop(job)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # -- internals ------------------------------------------------------------------------

    def _submit(self, fn: JobFunction[Any], args: tuple[Any, ...], label: str,
                sink: Callable[[Any], None] | None) -> _Job:
        if self._closed:
            raise WorkerClosed(f"{self.name} is closed")
        job = _Job(JobContext(next(self._ids), label, sink), fn, args)
        self._jobs.add(job)
        job.result.add_done_callback(lambda _: self._jobs.discard(job))
        job.thread_future = self._executor.submit(self._execute, job)
        return job

    def _cancel(self, job: _Job) -> None:
        """The caller has gone: stop the job; its result, if any, goes nowhere. A job still queued
        is dropped now: left in the queue, a close() could discard it before the thread saw it."""
        job.ctx.cancel()
        job.result.cancel()
        self._jobs.discard(job)
        if job.thread_future is not None and job.thread_future.cancel():
            self._drop(job)

    def _execute(self, job: _Job) -> None:
        ctx = job.ctx
        if ctx.cancelled:  # its caller left, or the worker closed, while it was queued
            self._drop(job)
            return
        log.info("%s: %s started", self.name, _describe(ctx))
        began = time.monotonic()
        try:
            value = job.fn(ctx, *job.args)
        except BaseException as exc:  # handed to the awaiting side, not lost
            self._report_exception(job, exc, time.monotonic() - began)
        else:
            self._report_value(job, value, time.monotonic() - began)
        finally:
            self._run_after_job()

    def _report_value(self, job: _Job, value: Any, took: float) -> None:
        ctx = job.ctx
        if ctx.cancelled:
            log.info("%s: %s finished in %.2f s, after its caller had gone", self.name, _describe(ctx), took)
        else:
            log.info("%s: %s finished in %.2f s", self.name, _describe(ctx), took)
        job.settle(lambda future: future.set_result(value))

    def _report_exception(self, job: _Job, exc: BaseException, took: float) -> None:
        ctx = job.ctx
        if isinstance(exc, JobCancelled) and ctx.cancelled:
            log.info("%s: %s cancelled after %.2f s", self.name, _describe(ctx), took)
            error: BaseException = WorkerClosed(f"{self.name} closed") if ctx.closing else exc
        else:
            log.info("%s: %s failed after %.2f s: %s: %s", self.name, _describe(ctx), took, type(exc).__name__, exc)
            error = exc
        job.settle(lambda future: future.set_exception(error))

    def _run_after_job(self) -> None:
        if self._after_job is None:
            return
        try:
            self._after_job()
        except Exception:
            log.exception("%s: the after-job hook failed", self.name)

    def _drop(self, job: _Job) -> None:
        log.info("%s: %s dropped before it started", self.name, _describe(job.ctx))
        closing, closed = job.ctx.closing, WorkerClosed(f"{self.name} closed")

        def outcome(future: asyncio.Future[Any]) -> None:
            if closing:
                future.set_exception(closed)
            else:
                future.cancel()  # its caller has gone already

        job.settle(outcome)


def _describe(ctx: JobContext) -> str:
    return f"job {ctx.id} ({ctx.label})" if ctx.label else f"job {ctx.id}"


__all__ = ["JobCancelled", "JobContext", "Worker", "WorkerClosed"]

"""core.runtime.worker in-process: one job at a time, cancellation that ends the thread's work first, streams, close.

Jobs here block on events the test sets, so every ordering below is forced, never timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from core.runtime.worker import JobCancelled, JobContext, Worker, WorkerClosed

WAIT = 10.0  # seconds: only a broken worker ever gets near it


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


async def wait_event(event: threading.Event) -> None:
    """Wait, without blocking the loop, until a job thread sets ``event``."""
    assert await asyncio.to_thread(event.wait, WAIT), "the job never got there"


def log_position(caplog: pytest.LogCaptureFixture, pattern: str) -> int:
    matches = [i for i, message in enumerate(caplog.messages) if re.search(pattern, message)]
    assert len(matches) == 1, (pattern, caplog.messages)
    return matches[0]


class Recorder:
    """What the job threads did, in order, and on which thread."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def note(self, event: str) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.add(threading.get_ident())


def test_jobs_run_one_at_a_time_in_submission_order() -> None:
    record, release_first, first_started = Recorder(), threading.Event(), threading.Event()

    def job(ctx: JobContext, name: str) -> str:
        record.note(f"{name} start")
        if name == "first":
            first_started.set()
            assert release_first.wait(WAIT)
        record.note(f"{name} end")
        return name.upper()

    async def main() -> None:
        worker = Worker("test")
        first = asyncio.create_task(worker.run(job, "first"))
        await wait_event(first_started)
        others = [asyncio.create_task(worker.run(job, name)) for name in ("second", "third")]
        await asyncio.sleep(0)  # let them submit while the first job still holds the thread
        release_first.set()
        assert await asyncio.gather(first, *others) == ["FIRST", "SECOND", "THIRD"]
        await worker.close()

    run(main)
    assert record.events == ["first start", "first end", "second start", "second end", "third start", "third end"]
    assert len(record.threads) == 1  # one thread: two jobs cannot overlap


def test_a_cancelled_job_ends_in_its_thread_before_the_next_starts(caplog: pytest.LogCaptureFixture) -> None:
    record, started, let_it_end = Recorder(), threading.Event(), threading.Event()

    def long_job(ctx: JobContext) -> None:
        record.note("long start")
        started.set()
        assert ctx.wait(WAIT)  # the cancel flag reaches the thread
        record.note("long saw the cancel")
        assert let_it_end.wait(WAIT)  # still busy after its caller has gone
        record.note("long end")
        ctx.check()

    def short_job(ctx: JobContext) -> str:
        record.note("short start")
        return "done"

    async def main() -> None:
        worker = Worker("test")
        long = asyncio.create_task(worker.run(long_job, label="long"))
        await wait_event(started)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long  # the caller is free at once...
        assert "long end" not in record.events  # ...while the thread still works on the job
        short = asyncio.create_task(worker.run(short_job, label="short"))
        await asyncio.sleep(0)
        let_it_end.set()
        assert await short == "done"
        await worker.close()

    with caplog.at_level(logging.INFO, logger="core.runtime.worker"):
        run(main)
    assert record.events == ["long start", "long saw the cancel", "long end", "short start"]
    cancelled = log_position(caplog, r"^test: job 1 \(long\) cancelled after \d+\.\d\d s$")
    assert log_position(caplog, r"^test: job 2 \(short\) started$") > cancelled


def test_a_queued_job_whose_caller_left_never_runs(caplog: pytest.LogCaptureFixture) -> None:
    record, started, release = Recorder(), threading.Event(), threading.Event()

    def blocker(ctx: JobContext) -> None:
        started.set()
        assert release.wait(WAIT)

    def queued(ctx: JobContext) -> None:
        record.note("queued ran")

    async def main() -> None:
        worker = Worker("test")
        first = asyncio.create_task(worker.run(blocker))
        await wait_event(started)
        waiting = asyncio.create_task(worker.run(queued))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await first
        await worker.close()

    with caplog.at_level(logging.INFO, logger="core.runtime.worker"):
        run(main)
    assert record.events == []
    log_position(caplog, r"^test: job 2 dropped before it started$")


def test_stopping_a_stream_cancels_its_job_before_the_next(caplog: pytest.LogCaptureFixture) -> None:
    record = Recorder()

    def tokens(ctx: JobContext, count: int) -> None:
        for token in range(count):
            ctx.emit(token)
        assert ctx.wait(WAIT)  # more would come; the consumer has to leave for this to end
        record.note("stream end")
        ctx.check()

    def next_job(ctx: JobContext) -> None:
        record.note("next start")

    async def main() -> None:
        worker = Worker("test")
        received = []
        async with contextlib.aclosing(worker.stream(tokens, 3, label="tokens")) as items:
            async for item in items:
                received.append(item)
                if len(received) == 3:
                    break
        assert received == [0, 1, 2]
        await worker.run(next_job)
        await worker.close()

    with caplog.at_level(logging.INFO, logger="core.runtime.worker"):
        run(main)
    assert record.events == ["stream end", "next start"]
    cancelled = log_position(caplog, r"^test: job 1 \(tokens\) cancelled after")
    assert log_position(caplog, r"^test: job 2 started$") > cancelled


def test_cancelling_the_consumer_of_a_stream_cancels_its_job() -> None:
    first_item, saw_cancel = asyncio.Event(), threading.Event()

    def tokens(ctx: JobContext) -> None:
        ctx.emit("first")
        if ctx.wait(WAIT):
            saw_cancel.set()
        ctx.check()

    async def consume(worker: Worker) -> None:
        async for _ in worker.stream(tokens):
            first_item.set()

    async def main() -> None:
        worker = Worker("test")
        consumer = asyncio.create_task(consume(worker))
        await first_item.wait()
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await worker.close()  # waits for the job's thread function to return
        assert saw_cancel.is_set()

    run(main)


def test_a_stream_delivers_every_item_then_the_jobs_error() -> None:
    def tokens(ctx: JobContext) -> None:
        ctx.emit("a")
        ctx.emit("b")
        raise ValueError("the model broke")

    async def main() -> None:
        worker = Worker("test")
        received = []
        with pytest.raises(ValueError, match="the model broke"):
            async for item in worker.stream(tokens):
                received.append(item)
        assert received == ["a", "b"]
        await worker.close()

    run(main)


def test_close_drops_the_queue_and_waits_for_the_running_job(caplog: pytest.LogCaptureFixture) -> None:
    record, started = Recorder(), threading.Event()

    def running(ctx: JobContext) -> None:
        started.set()
        assert ctx.wait(WAIT)
        record.note("running end")
        ctx.check()

    def queued(ctx: JobContext) -> None:
        record.note("queued ran")

    async def main() -> None:
        worker = Worker("test")
        first = asyncio.create_task(worker.run(running, label="running"))
        await wait_event(started)
        second = asyncio.create_task(worker.run(queued, label="queued"))
        await asyncio.sleep(0)
        await worker.close()
        assert record.events == ["running end"]  # close() returned after the thread function did
        for task in (first, second):
            with pytest.raises(WorkerClosed):
                await task
        with pytest.raises(WorkerClosed):
            await worker.run(queued)

    with caplog.at_level(logging.INFO, logger="core.runtime.worker"):
        run(main)
    assert record.events == ["running end"]
    log_position(caplog, r"^test: job 1 \(running\) cancelled after")
    log_position(caplog, r"^test: job 2 \(queued\) dropped before it started$")


def test_a_jobs_exception_reaches_its_caller_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    after_job: list[str] = []

    def broken(ctx: JobContext) -> None:
        raise ValueError("bad input")

    def fine(ctx: JobContext, value: int) -> int:
        return value * 2

    async def main() -> None:
        worker = Worker("test", after_job=lambda: after_job.append(threading.current_thread().name))
        with pytest.raises(ValueError, match="bad input"):
            await worker.run(broken)
        assert await worker.run(fine, 21) == 42
        await worker.close()

    with caplog.at_level(logging.INFO, logger="core.runtime.worker"):
        run(main)
    log_position(caplog, r"^test: job 1 failed after \d+\.\d\d s: ValueError: bad input$")
    log_position(caplog, r"^test: job 2 finished in \d+\.\d\d s$")
    assert len(after_job) == 2 and all(name.startswith("test-worker") for name in after_job)


def test_check_outside_a_cancellation_raises_nothing_and_emit_needs_a_stream() -> None:
    ctx = JobContext(1, "")
    ctx.check()
    with pytest.raises(TypeError, match="stream"):
        ctx.emit("x")
    ctx.cancel()
    with pytest.raises(JobCancelled):
        ctx.check()

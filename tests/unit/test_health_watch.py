"""The health watch's counting, ending and memory behaviour, against a stand-in service."""

from __future__ import annotations

import asyncio
import errno
import gc
import time
import weakref
from typing import Any, cast

import httpx

from core.supervision.health_watch import start_health_watch
from core.supervision.service_state import ServiceState

TICK = 0.001


class Stub:
    """What the watch uses of a ManagedService: name, state, probe(), hung()."""

    name = "stub"

    def __init__(self, answers: list[bool | BaseException]) -> None:
        self.state = ServiceState.READY
        self.answers = answers
        self.probes = 0
        self.hung_reasons: list[str] = []

    async def probe(self, timeout: float) -> bool:
        self.probes += 1
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def hung(self, reason: str) -> None:
        self.hung_reasons.append(reason)
        self.state = ServiceState.STOPPING


def watch(stub: Stub, failures: int = 3, interval: float = TICK) -> asyncio.Task[None]:
    task = start_health_watch(cast(Any, stub), interval, failures)
    assert task is not None
    return task


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(TICK)


def test_failures_in_a_row_mark_the_service_hung_once() -> None:
    async def main() -> None:
        stub = Stub([False, False, False])
        task = watch(stub)
        await asyncio.wait_for(task, 5)
        assert stub.hung_reasons == ["hung: 3 health probes failed in a row"]
    asyncio.run(main())


def test_an_answer_in_between_starts_the_count_over() -> None:
    async def main() -> None:
        stub = Stub([False, False, True, False, False, True])
        task = watch(stub)
        await until(lambda: stub.probes >= 8)
        assert not stub.hung_reasons and not task.done()
        task.cancel()
    asyncio.run(main())


def test_probes_we_could_not_make_do_not_count() -> None:
    async def main() -> None:
        out_of_fds = httpx.ConnectError("connect failed")
        out_of_fds.__cause__ = OSError(errno.EMFILE, "Too many open files")
        stub = Stub([False, out_of_fds, False, RuntimeError("bug"), True, False, False])
        task = watch(stub)
        await until(lambda: stub.probes >= 9)
        assert not stub.hung_reasons and not task.done()
        task.cancel()
    asyncio.run(main())


def test_the_watch_ends_when_the_service_leaves_ready() -> None:
    async def main() -> None:
        stub = Stub([])
        task = watch(stub)
        await until(lambda: stub.probes >= 2)
        stub.state = ServiceState.STOPPING
        await asyncio.wait_for(task, 5)
        assert not stub.hung_reasons
    asyncio.run(main())


def test_the_watch_does_not_keep_its_service_alive() -> None:
    def watched() -> tuple[weakref.ref[Stub], asyncio.Task[None]]:
        stub = Stub([])
        return weakref.ref(stub), watch(stub, interval=0.01)

    async def main() -> None:
        ref, task = watched()
        gc.collect()
        assert ref() is None  # only the watch knew it, and the watch holds it weakly
        await asyncio.wait_for(task, 5)  # and then it ends by itself
    asyncio.run(main())


def test_interval_zero_turns_probing_off() -> None:
    async def main() -> None:
        assert start_health_watch(cast(Any, Stub([])), 0, 3) is None
    asyncio.run(main())

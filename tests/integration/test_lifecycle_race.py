"""Issue #9: a stop wins over the start it interrupts, however that start ends; no stuck STOPPING.

Each race is forced, not hoped for: the readiness probe is replaced by one that, at the
moment the real service has answered healthy, calls ``stop()`` and then ends the way the
parameter says. ``wait_for`` reproduces Python 3.11's ``asyncio.wait_for``, which returns
the result and swallows the stop's cancellation when the awaited call has just completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from core.service_manager import ManagedService, ServiceManager, StartFailed
from core.supervision.service_state import ServiceState
from tests.integration.manager_harness import alive, run_manager, wait_for_condition, wait_state

pytestmark = pytest.mark.integration

Probe = Callable[[ManagedService, float], Awaitable[bool]]


async def healthy_now(svc: ManagedService) -> bool:
    return True


async def wait_for_swallows(svc: ManagedService) -> bool:
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(answer.set_result, True)  # lands in the same loop turn as the stop
    return await asyncio.wait_for(answer, 5)


async def swallows_cancellation(svc: ManagedService) -> bool:
    with contextlib.suppress(asyncio.CancelledError):  # a careless HTTP client eats the stop's cancellation
        await asyncio.sleep(30)
    return True


async def fails(svc: ManagedService) -> bool:
    raise StartFailed("not healthy after all")


async def raises(svc: ManagedService) -> bool:
    raise RuntimeError("probe bug")


async def unhealthy(svc: ManagedService) -> bool:
    return False


ENDINGS = [healthy_now, wait_for_swallows, swallows_cancellation, fails, raises, unhealthy]


def racing_probe(real: Probe, ending: Callable[[ManagedService], Awaitable[bool]],
                 stops: list[asyncio.Future[None]], pids: list[int]) -> Probe:
    """A probe that, once the service is really healthy, stops it and then ends with ``ending``."""
    async def probe(self: ManagedService, timeout: float = 5.0) -> bool:
        if stops:  # raced already: the next start probes for real
            return await real(self, timeout)
        if not await real(self, timeout):
            return False
        assert self.pid is not None
        pids.append(self.pid)
        stops.append(self.stop("stopped as the probe completes"))
        return await ending(self)
    return probe


@pytest.mark.parametrize("ending", ENDINGS, ids=[e.__name__ for e in ENDINGS])
def test_stop_landing_as_the_probe_completes_always_ends_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    ending: Callable[[ManagedService], Awaitable[bool]],
) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        stops: list[asyncio.Future[None]] = []
        pids: list[int] = []
        monkeypatch.setattr(ManagedService, "probe", racing_probe(ManagedService.probe, ending, stops, pids))
        start = svc.start()
        await asyncio.wait({start}, timeout=30)
        assert start.done()
        assert start.cancelled(), f"the start should have been aborted, got {start.exception()!r}"
        (stop,) = stops
        await asyncio.wait_for(stop, 30)  # the stop itself completes, raising nothing
        assert svc.state is ServiceState.STOPPED
        assert svc.process is None and not alive(pids[0])
        assert svc.failures == [] and svc.last_error is None  # a stop's abort is no failure
        await svc.start()  # and the next start is a normal one
        assert svc.state is ServiceState.READY
    with caplog.at_level(logging.ERROR):
        run_manager(scenario, tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "Illegal" in r.getMessage()]


def test_a_waiter_giving_up_does_not_cancel_the_stop(tmp_path: Path) -> None:
    """A client that disconnects while its unload waits must not leave the model STOPPING for good."""
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        pid = svc.pid
        assert pid is not None
        svc.stop("unload").cancel()
        await wait_state(svc, ServiceState.STOPPED)
        assert not alive(pid)
    run_manager(scenario, tmp_path, args=["--drain-delay", "0.5"])


def test_a_waiter_giving_up_does_not_cancel_the_start(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        svc.start().cancel()
        await wait_state(svc, ServiceState.READY, timeout=30)
    run_manager(scenario, tmp_path)


def test_a_start_cancelled_by_anything_but_a_stop_cleans_up(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        start = svc.start()
        await wait_for_condition(lambda: svc.pid is not None, "the spawn")
        pid = svc.pid
        assert pid is not None and "start" in svc._tasks
        svc._tasks["start"].cancel()
        await asyncio.wait({start})
        assert start.cancelled()
        await wait_state(svc, ServiceState.STOPPED)
        assert not alive(pid)
    run_manager(scenario, tmp_path, args=["--start-delay", "30"], startup_time=60)


def test_cancelling_a_start_never_cancels_the_stops_it_waits_for(tmp_path: Path) -> None:
    """A start waits for evicted services' stops; aborting it must leave those stops running."""
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        release = asyncio.Event()

        async def other_services_stop() -> None:
            await release.wait()
        eviction = asyncio.ensure_future(other_services_stop())
        start = svc.start(after=[eviction])
        await asyncio.sleep(0)
        await svc.stop("unload")
        assert start.cancelled() and svc.state is ServiceState.STOPPED
        assert not eviction.done()  # gather would have cancelled it
        release.set()
        await eviction
    run_manager(scenario, tmp_path)

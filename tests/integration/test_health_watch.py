"""Issue #9: a READY service that hangs (SIGSTOP, a wedged engine) is found, killed and restarted.

Real fake-service processes; probing every 0.2 s so a hang is found within about a second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from core.service_manager import ServiceManager
from core.supervision.service_state import ServiceState
from tests.integration.manager_harness import alive, run_manager, start_and_freeze, wait_for_condition, wait_state

pytestmark = pytest.mark.integration

INTERVAL, FAILURES = 0.2, 3
FAST_PROBES = {"health_interval": INTERVAL, "health_failures": FAILURES}


@pytest.mark.parametrize("args", [[], ["--ignore-sigterm"]], ids=["handles-sigterm", "ignores-sigterm"])
def test_a_sigstopped_service_is_found_hung_killed_and_restarts(tmp_path: Path, args: list[str]) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        pid = await start_and_freeze(svc)
        began = time.monotonic()
        # each round: the interval, then a probe that times out after min(5, interval)
        await wait_for_condition(lambda: svc.state is not ServiceState.READY, "the hang to be noticed",
                                 timeout=FAILURES * 2 * INTERVAL + 2)
        await wait_state(svc, ServiceState.STOPPED, timeout=svc.spec.stop_timeout + 3)
        assert time.monotonic() - began < FAILURES * 2 * INTERVAL + svc.spec.stop_timeout + 3
        assert not alive(pid)
        assert svc.last_error is not None and svc.last_error.startswith("hung: 3 health probes failed in a row")
        assert len(svc.failures) == 1
        await svc.start()  # what the next request does
        assert svc.state is ServiceState.READY and svc.pid not in (None, pid)
    run_manager(scenario, tmp_path, settings=FAST_PROBES, args=args, stop_timeout=1)


def test_a_service_that_keeps_answering_is_left_alone(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        pid = svc.pid
        answered = 0
        real_probe = svc.probe

        async def counting_probe(timeout: float = 5.0) -> bool:
            nonlocal answered
            healthy = await real_probe(timeout=timeout)
            answered += healthy
            return healthy

        svc.probe = counting_probe  # type: ignore[method-assign]  # the watch's own probes, counted
        # more answered probes than it takes to be found hung: the watch ran, and left it alone
        await wait_for_condition(lambda: answered >= FAILURES * 2, "several answered health probes")
        assert svc.state is ServiceState.READY and svc.pid == pid and not svc.failures
    run_manager(scenario, tmp_path, settings=FAST_PROBES)


def test_upstream_timeouts_in_a_row_mark_the_service_hung(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        pid = svc.pid
        assert pid is not None
        for _ in range(FAILURES - 1):
            svc.upstream_timed_out()
        svc.upstream_answered()  # an answer in between: the count starts over
        for _ in range(FAILURES - 1):
            svc.upstream_timed_out()
        assert svc.state is ServiceState.READY
        svc.upstream_timed_out()
        assert svc.state is ServiceState.STOPPING  # at once, not at the next health probe
        await wait_state(svc, ServiceState.STOPPED)
        assert not alive(pid)
        assert svc.last_error is not None and svc.last_error.startswith(
            "hung: 3 requests in a row got no answer within request_timeout")
        assert len(svc.failures) == 1
        await svc.start()
        assert svc.state is ServiceState.READY and svc.upstream_timeouts == 0
    run_manager(scenario, tmp_path, settings={"health_interval": 0, "health_failures": FAILURES})


def test_the_watch_runs_only_while_ready(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        watch = svc._health_watch
        assert watch is not None and not watch.done()
        await svc.stop()
        await asyncio.sleep(0)
        assert watch.done() and svc._health_watch is None
        await svc.start()
        watch = svc._health_watch
        assert watch is not None and svc.pid is not None
        os.kill(svc.pid, signal.SIGKILL)  # a crash ends the watch too
        await wait_state(svc, ServiceState.STOPPED)
        await asyncio.sleep(0)
        assert watch.done() and svc._health_watch is None
    run_manager(scenario, tmp_path, settings=FAST_PROBES)


def test_probing_off_starts_no_watch(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        assert svc._health_watch is None
    run_manager(scenario, tmp_path, settings={"health_interval": 0})

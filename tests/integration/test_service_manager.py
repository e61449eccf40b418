"""The service manager against real fake-service processes: start, health-wait, stop, crash, fail."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from core.service_manager import ServiceManager, StartFailed
from core.supervision.service_state import ServiceState
from tests.integration.manager_harness import alive, start_and_freeze, wait_for_condition, wait_state
from tests.integration.manager_harness import run_manager as run

pytestmark = pytest.mark.integration


def test_start_ready_then_stop_leaves_nothing(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        assert svc.state is ServiceState.READY
        pid = svc.pid
        assert pid is not None and psutil.pid_exists(pid)
        assert await svc.probe()
        await svc.stop()
        assert svc.state is ServiceState.STOPPED and svc.pid is None
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        log_text = (tmp_path / "logs" / "m.log").read_text()
        assert "m: ready" in log_text and "exited with status" in log_text  # labelled with its entry
    run(scenario, tmp_path)


def test_health_timeout_reports_reason_and_log_tail(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        with pytest.raises(StartFailed, match=r"not healthy after 1.5s") as info:
            await svc.start()
        assert "Application startup complete" in str(info.value)  # the log tail is included
        assert svc.state is ServiceState.STOPPED and svc.process is None
        assert len(svc.failures) == 1
    run(scenario, tmp_path, args=["--fail-health"], startup_time=1.5)


def test_exit_during_start_is_reported_at_once(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        began = time.monotonic()
        with pytest.raises(StartFailed, match="exited with status 1 during start") as info:
            await manager["m"].start()
        assert "fake load failure" in str(info.value)
        assert time.monotonic() - began < 10  # not the 20 s startup deadline
    run(scenario, tmp_path, args=["--fail-load"])


def test_sigterm_ignoring_service_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        pid = svc.pid
        began = time.monotonic()
        await svc.stop()
        took = time.monotonic() - began
        assert 1.0 <= took < 5.0, took
        assert svc.state is ServiceState.STOPPED
        assert pid is not None and not alive(pid)
    run(scenario, tmp_path, args=["--ignore-sigterm"], stop_timeout=1)


def test_stop_kills_grandchildren(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        assert svc.pid is not None
        children = psutil.Process(svc.pid).children(recursive=True)
        assert any("sleep" in c.name() for c in children)
        await svc.stop()
        assert not [c for c in children if alive(c.pid)]
    run(scenario, tmp_path, args=["--spawn-child"])


def test_stop_lets_the_service_shut_down_before_its_children_are_signalled(tmp_path: Path) -> None:
    """vLLM's engine core is a child of the text service: it must outlive the requests the service
    drains after SIGTERM, so the stop signals the service first and its children only after."""
    report = tmp_path / "child-report"

    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        assert svc.pid is not None
        (child,) = psutil.Process(svc.pid).children()
        await svc.stop()
        assert report.read_text() == "parent-gone"
        assert not alive(child.pid)
    run(scenario, tmp_path, args=["--child-reports-to", str(report), "--drain-delay", "1"], stop_timeout=10)


def test_crash_is_detected_and_counted(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        await svc.start()
        assert svc.pid is not None
        os.kill(svc.pid, signal.SIGKILL)
        await wait_state(svc, ServiceState.STOPPED)
        assert svc.last_error is not None and "crashed: exited with status -9" in svc.last_error
        assert len(svc.failures) == 1
        await svc.start()  # restarts on demand
        assert svc.state is ServiceState.READY and svc.restarts == 1
    run(scenario, tmp_path)


def test_repeated_failures_mark_failed_until_reset(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        for _ in range(2):
            with pytest.raises(StartFailed):
                await svc.start()
        assert svc.state is ServiceState.FAILED
        assert svc.failed_until > time.monotonic() + 200  # the default cooldown is 300 s
        svc.reset()
        assert svc.state is ServiceState.STOPPED and not svc.failures
    run(scenario, tmp_path, args=["--fail-load"], max_restarts=2)


def test_port_in_use_names_the_holder(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", svc.spec.port))
            sock.listen()
            with pytest.raises(StartFailed, match=rf"port {svc.spec.port} is already in use by pid {os.getpid()}"):
                await svc.start()
    run(scenario, tmp_path)


def test_stop_during_start_aborts_it(tmp_path: Path) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        start = svc.start()
        await wait_for_condition(lambda: svc.pid is not None, "the service process to be spawned")
        pid = svc.pid
        assert pid is not None and alive(pid)  # spawned, and still in its 30 s start delay
        assert not start.done()
        await svc.stop()
        assert start.cancelled()
        assert svc.state is ServiceState.STOPPED and not alive(pid)
    run(scenario, tmp_path, args=["--start-delay", "30"], startup_time=60)


@pytest.mark.parametrize(("args", "graceful"), [([], True), (["--ignore-sigterm"], False)],
                         ids=["handles-sigterm", "ignores-sigterm"])
def test_stopping_a_sigstopped_service_ends_within_stop_timeout(tmp_path: Path, args: list[str],
                                                                graceful: bool) -> None:
    """SIGTERM waits for SIGCONT, so the stop continues the process: it shuts down in order; SIGKILL otherwise."""
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        pid = await start_and_freeze(svc)
        began = time.monotonic()
        await svc.stop()
        took = time.monotonic() - began
        assert svc.state is ServiceState.STOPPED and not alive(pid)
        if graceful:
            assert took < svc.spec.stop_timeout
            assert "m: stopped" in (tmp_path / "logs" / "m.log").read_text()  # its own shutdown ran
        else:
            assert svc.spec.stop_timeout <= took < svc.spec.stop_timeout + 3
    run(scenario, tmp_path, args=args, stop_timeout=2)

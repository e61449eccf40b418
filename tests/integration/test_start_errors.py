"""Issue #9: whatever a start raises ends it. No model stays STARTING (holding its GPU share) for good.

Errors the service is to blame for, or cannot be told apart from it, are failures on record
(STOPPED with a backoff, FAILED once the restart policy gives up); the orchestrator running
out of file descriptors is not: STOPPED, nothing counted, the next request tries again.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

import core.supervision.service_process
from core.service_manager import ManagedService, ServiceManager, StartFailed
from core.supervision.service_state import ServiceState
from tests.integration.manager_harness import alive, run_manager

pytestmark = pytest.mark.integration

EMFILE = OSError(errno.EMFILE, "Too many open files")


def raiser(exc: BaseException) -> Any:
    def raise_it(*args: Any, **kwargs: Any) -> NoReturn:
        raise exc
    return raise_it


async def assert_starts_again(svc: ManagedService) -> None:
    """After the cause is gone, the next start works (nothing left STARTING, no stale process)."""
    await svc.start()
    assert svc.state is ServiceState.READY


def test_unwritable_log_dir_fails_the_start_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")

    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        with pytest.raises(StartFailed, match=r"cannot open log file .*/not-a-dir/logs/m\.log: Not a directory"):
            await svc.start()
        assert svc.state is ServiceState.STOPPED and svc.process is None
        assert svc.last_error is not None and svc.last_error.startswith("cannot open log file")
        assert len(svc.failures) == 1  # counted: the restart policy backs off and in the end gives up
    run_manager(scenario, tmp_path, settings={"log_dir": str(blocker / "logs")})


def test_an_error_of_the_port_check_fails_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        monkeypatch.setattr(core.supervision.service_process, "port_holder",
                            raiser(OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")))
        with pytest.raises(StartFailed, match=rf"cannot check port {svc.spec.port}: Address family not supported"):
            await svc.start()
        assert svc.state is ServiceState.FAILED  # max_restarts 1: the policy gives up at once
        assert svc.last_error is not None and "Address family not supported" in svc.last_error
        monkeypatch.undo()
        svc.reset()
        await assert_starts_again(svc)
    run_manager(scenario, tmp_path, max_restarts=1)


def test_an_unexpected_exception_fails_the_start_with_its_type(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        monkeypatch.setattr(svc.log, "open", raiser(RuntimeError("boom")))
        with pytest.raises(StartFailed, match="unexpected error during start: RuntimeError: boom"):
            await svc.start()
        assert svc.state is ServiceState.STOPPED and len(svc.failures) == 1
        assert svc.last_error is not None and "RuntimeError: boom" in svc.last_error
        monkeypatch.undo()
        await assert_starts_again(svc)
    run_manager(scenario, tmp_path)


def test_an_exception_after_spawning_also_ends_the_process(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        spawned: list[int] = []

        async def broken_probe(self: ManagedService, timeout: float = 5.0) -> bool:
            assert self.pid is not None
            spawned.append(self.pid)
            raise ValueError("probe bug")
        monkeypatch.setattr(ManagedService, "probe", broken_probe)
        with pytest.raises(StartFailed, match="ValueError: probe bug"):
            await svc.start()
        assert svc.state is ServiceState.STOPPED and svc.process is None
        assert spawned and not alive(spawned[0])
    run_manager(scenario, tmp_path)


@pytest.mark.parametrize("where", ["port check", "log file", "spawn", "health probe"])
def test_running_out_of_fds_is_not_the_services_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      where: str) -> None:
    async def scenario(manager: ServiceManager) -> None:
        svc = manager["m"]
        svc.not_before = 0.0
        spawned: list[int] = []
        if where == "port check":
            monkeypatch.setattr(core.supervision.service_process, "port_holder", raiser(EMFILE))
        elif where == "log file":
            monkeypatch.setattr(svc.log, "open", raiser(EMFILE))
        elif where == "spawn":
            monkeypatch.setattr(core.supervision.service_process, "spawn_group_leader", raiser(EMFILE))
        else:
            async def get(url: str, **kwargs: Any) -> NoReturn:
                assert svc.pid is not None
                spawned.append(svc.pid)
                raise httpx.ConnectError("All connection attempts failed") from EMFILE  # as httpx wraps it
            monkeypatch.setattr(svc._health, "get", get)
        with pytest.raises(StartFailed, match=r"orchestrator is out of file descriptors \(EMFILE"):
            await svc.start()
        assert svc.state is ServiceState.STOPPED  # not FAILED, no cooldown
        assert svc.failures == [] and svc.last_error is None
        assert svc.not_before <= time.monotonic()  # no backoff: the next request retries at once
        assert svc.process is None and not any(alive(pid) for pid in spawned)
        monkeypatch.undo()
        await assert_starts_again(svc)
    run_manager(scenario, tmp_path)

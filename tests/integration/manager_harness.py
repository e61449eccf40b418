"""A ServiceManager over real fake-service processes, run inside one test (shared by the lifecycle tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from core.config.load import config_from_dict
from core.service_manager import ManagedService, ServiceManager
from core.supervision.service_state import ServiceState
from tests.integration.conftest import REPO, fake_model


def run_manager(test: Callable[[ServiceManager], Awaitable[None]], tmp_path: Path,
                settings: dict[str, Any] | None = None, **spec: Any) -> None:
    """Run ``test`` against a manager with one fake model "m" (knobs in spec["args"]), then shut it down."""
    args = spec.pop("args", [])
    raw = {"settings": {"log_dir": str(tmp_path / "logs"), "base_dir": str(REPO), "restart_backoff": 0,
                        **(settings or {})},
           "models": {"m": fake_model("m", *args, **spec)}}
    config = config_from_dict(raw, tmp_path / "models.yaml")

    async def main() -> None:
        manager = ServiceManager(config, use_reaper=False)
        try:
            await test(manager)
        finally:
            await manager.shutdown()
    asyncio.run(main())


async def wait_state(svc: ManagedService, state: ServiceState, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while svc.state is not state:
        assert time.monotonic() < deadline, f"{svc.name} stayed {svc.state} (wanted {state})"
        await asyncio.sleep(0.02)


async def wait_for_condition(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def start_and_freeze(svc: ManagedService) -> int:
    """Start ``svc`` and SIGSTOP it (a hang: pid and port kept, nothing answered); return its pid."""
    await svc.start()
    pid = svc.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    return pid


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

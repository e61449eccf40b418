"""The lifecycle and request path neither lose a cancellation nor block the event loop (#19).

* No ``asyncio.wait_for`` in the product's code: before Python 3.12 it may swallow the caller's
  cancellation (core/common/aio.py); ``core.common.aio.within`` is used instead. Checked on the parsed code of
  every module, so a comment or a docstring naming it does not count.
* NVML is only called off the event loop: a stand-in ``pynvml`` (no driver here) fails any call
  made on the loop's thread, and the GPU-memory wait and the park's freed-memory check run over it.
"""

from __future__ import annotations

import ast
import asyncio
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.common.aio import event_within, within
from core.host.gpu import wait_for_free_memory

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("core", "model-orchestrator", "models")
GIB = 1024**3


def _wait_for_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "wait_for"
            and isinstance(node.value, ast.Name) and node.value.id == "asyncio"]


def test_no_asyncio_wait_for_in_the_product() -> None:
    found = {str(path.relative_to(REPO)): lines for folder in PRODUCT for path in sorted((REPO / folder).rglob("*.py"))
             if (lines := _wait_for_calls(path))}
    assert found == {}, ("asyncio.wait_for can swallow a cancellation (core/common/aio.py); "
                         f"use core.common.aio.within: {found}")


def test_the_scan_sees_a_call(tmp_path: Path) -> None:
    # The check above would pass vacuously if it could not find a call; here it must.
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncio\nasync def f(e):\n    await asyncio.wait_for(e.wait(), 1)\n")
    assert _wait_for_calls(sample) == [3]


# --- within: wait_for's contract, cancellation kept ------------------------------------------------------


def test_within_returns_the_result_or_times_out_and_cancels() -> None:
    async def main() -> None:
        assert await within(asyncio.sleep(0, "done"), 1) == "done"
        slow = asyncio.ensure_future(asyncio.sleep(30))
        with pytest.raises(asyncio.TimeoutError):
            await within(slow, 0.01)
        assert slow.cancelled()

    asyncio.run(main())


def test_a_cancelled_caller_is_cancelled_even_when_the_work_completes_at_once() -> None:
    # The wait_for hazard: the awaited work finishes in the same loop turn as the caller's cancel.
    async def main() -> None:
        work: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiter = asyncio.ensure_future(within(work, 10))
        await asyncio.sleep(0)  # the waiter is now inside asyncio.wait
        work.set_result("done")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


def test_event_within() -> None:
    async def main() -> None:
        event = asyncio.Event()
        assert await event_within(event, 0.01) is False
        asyncio.get_running_loop().call_soon(event.set)
        assert await event_within(event, 5) is True

    asyncio.run(main())


# --- NVML off the event loop -------------------------------------------------------------------------------


class LoopGuardNvml:
    """A stand-in ``pynvml`` over one device whose free memory the test sets; any call made on
    the event loop's thread is recorded as a violation."""

    def __init__(self, total: int, free: int) -> None:
        self.total, self.free = total, free
        self.on_loop: list[str] = []
        self.inits = 0
        self.loop_thread = threading.get_ident()

    def _call(self, name: str) -> None:
        if threading.get_ident() == self.loop_thread:
            self.on_loop.append(name)

    def module(self) -> Any:
        def init() -> None:
            self._call("nvmlInit")
            self.inits += 1

        def info(handle: int) -> Any:
            self._call("nvmlDeviceGetMemoryInfo")
            return SimpleNamespace(total=self.total, free=self.free, used=self.total - self.free)

        def handle(index: int) -> int:
            self._call("nvmlDeviceGetHandleByIndex")
            return index

        def processes(handle: int) -> list[Any]:
            self._call("nvmlDeviceGetComputeRunningProcesses")
            return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=GIB)]

        return SimpleNamespace(nvmlInit=init, nvmlDeviceGetMemoryInfo=info, nvmlDeviceGetHandleByIndex=handle,
                               nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetComputeRunningProcesses=processes)


def test_the_gpu_memory_wait_reads_nvml_off_the_loop_and_initialises_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        nvml = LoopGuardNvml(total=80 * GIB, free=2 * GIB)
        monkeypatch.setitem(sys.modules, "pynvml", nvml.module())

        async def free_later() -> None:
            await asyncio.sleep(0.05)
            nvml.free = 40 * GIB

        freeing = asyncio.ensure_future(free_later())
        await wait_for_free_memory(30, timeout=5, interval=0.01)
        await freeing
        assert nvml.free == 40 * GIB
        assert nvml.on_loop == [], f"NVML called on the event loop: {nvml.on_loop}"
        assert nvml.inits == 1  # not re-initialised at every poll

    asyncio.run(main())


def test_the_park_check_reads_nvml_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.supervision.park_client import ParkOutcome
    from core.supervision.service_park import run_park
    from core.supervision.service_state import ParkRecord, ServiceState

    async def main() -> None:
        nvml = LoopGuardNvml(total=80 * GIB, free=2 * GIB)
        monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
        settled: list[ServiceState] = []

        async def park(level: int) -> ParkOutcome:
            return ParkOutcome(0.01, GIB)

        svc: Any = SimpleNamespace(pid=os.getpid(), spec=SimpleNamespace(vram_gb=1.0),
                                   parker=SimpleNamespace(park=park),
                                   park_record=ParkRecord(),
                                   park_settled=lambda state, reason: settled.append(state),
                                   park_failed=lambda reason: settled.append(ServiceState.STOPPING))
        await run_park(svc, 1, [])
        assert settled == [ServiceState.PARKED]
        assert nvml.on_loop == [], f"NVML called on the event loop: {nvml.on_loop}"
        assert nvml.inits >= 1  # it was read (off the loop), not skipped

    asyncio.run(main())

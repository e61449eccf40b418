"""GPU memory facts from NVML (the nvidia-ml-py package), when there is a GPU.

Everything degrades to "unknown" (None) on a machine without a GPU, a driver, or
nvidia-ml-py, so the orchestrator runs unchanged on CPU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)
_GIB = 1024**3


def _nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses: no driver, no device, ...
        log.debug("NVML unavailable: %s", exc)
        return None
    return pynvml


def gpu_memory_gb(index: int = 0) -> tuple[float, float] | None:
    """(total, free) GiB of GPU ``index``, or None when it cannot be read."""
    nvml = _nvml()
    return None if nvml is None else _memory_gb(nvml, index)


def _memory_gb(nvml: Any, index: int) -> tuple[float, float] | None:
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
    except Exception as exc:
        log.debug("NVML could not read GPU %d: %s", index, exc)
        return None
    return info.total / _GIB, info.free / _GIB


def resolve_budget(configured: float | str) -> float | None:
    """The GPU budget in GiB: the configured number, else the GPU's total, else None (unlimited)."""
    if not isinstance(configured, str):
        return float(configured)
    memory = gpu_memory_gb()
    return None if memory is None else memory[0]


async def wait_for_free_memory(need_gb: float, timeout: float = 10.0, interval: float = 0.05) -> None:
    """After stopping services, wait (bounded) until the driver reports ``need_gb`` free.

    A killed CUDA process can take a moment to give its memory back; starting the next
    model before that makes it fail with out-of-memory. Without NVML this returns at once.
    """
    deadline = time.monotonic() + timeout
    # NVML blocks (and nvmlInit is slow): off the event loop, initialised once per wait.
    nvml = await asyncio.to_thread(_nvml)
    if nvml is None:
        return
    while (memory := await asyncio.to_thread(_memory_gb, nvml, 0)) is not None and memory[1] < need_gb:
        if time.monotonic() >= deadline:
            log.warning("GPU still has only %.1f GiB free after %.0fs (need %.1f); starting anyway",
                        memory[1], timeout, need_gb)
            return
        await asyncio.sleep(interval)


def gpu_bytes_by_pid() -> dict[int, int] | None:
    """GPU memory each process uses now, over every GPU (NVML); None when it cannot be read.

    A process whose usage NVML cannot see (some containers hide other PID namespaces) is absent.
    """
    nvml = _nvml()
    if nvml is None:
        return None
    used: dict[int, int] = {}
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.usedGpuMemory is not None:
                    used[proc.pid] = used.get(proc.pid, 0) + int(proc.usedGpuMemory)
    except Exception as exc:
        log.debug("NVML could not list GPU processes: %s", exc)
        return None
    return used

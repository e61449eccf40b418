"""GPU memory facts from NVML (the nvidia-ml-py package), when there is a GPU.

Everything degrades to "unknown" (None) on a machine without a GPU, a driver, or
nvidia-ml-py, so the orchestrator runs unchanged on CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import psutil

from core.host.gpu_inventory import Gpu, read_inventory

log = logging.getLogger(__name__)
_GIB = 1024**3
_BLIND_FLOOR = 1 * _GIB  # device memory no process accounts for that is still not "blindness" (driver, contexts)
_warned_blind = False


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


def gpu_inventory(environ: Mapping[str, str] = os.environ) -> list[Gpu] | None:
    """The GPUs this process may place models on (core/host/gpu_inventory.py); None without NVML.
    Raises InventoryError when they cannot be used as they are (MIG)."""
    nvml = _nvml()
    return None if nvml is None else read_inventory(nvml, environ)


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


GPU_PROCESS_OVERHEAD_GB = 0.5  # a CUDA context with torch's kernels loaded lazily: ~0.3-0.7 GiB


def resolve_process_overhead(configured: float | str, gpus: list[Gpu] | None = None) -> float:
    """settings.gpu_process_overhead_gb in GiB: the number, or (``auto``) a CUDA context's size when
    this process may use a GPU (``gpus``, default: read NVML), else 0 (services on the CPU hold no context)."""
    if not isinstance(configured, str):
        return float(configured)
    return GPU_PROCESS_OVERHEAD_GB if (gpu_inventory() if gpus is None else gpus) else 0.0


def resolve_budget(configured: float | str, gpus: list[Gpu] | None = None) -> float | None:
    """The GPU budget in GiB: the configured number, else the total of the first GPU this process may
    use (``gpus``, default: read NVML; under CUDA_VISIBLE_DEVICES=2,3 that is GPU 2, where services
    land), else None (unlimited)."""
    if not isinstance(configured, str):
        return float(configured)
    gpus = gpu_inventory() if gpus is None else gpus
    return gpus[0].total_gb if gpus else None


async def wait_for_free_memory(need_gb: float, timeout: float = 10.0, interval: float = 0.05,
                               index: int = 0) -> None:
    """After stopping services, wait (bounded) until the driver reports ``need_gb`` free on GPU ``index``.

    A killed CUDA process can take a moment to give its memory back; starting the next
    model before that makes it fail with out-of-memory. Without NVML this returns at once.
    """
    deadline = time.monotonic() + timeout
    # NVML blocks (and nvmlInit is slow): off the event loop, initialised once per wait.
    nvml = await asyncio.to_thread(_nvml)
    if nvml is None:
        return
    while (memory := await asyncio.to_thread(_memory_gb, nvml, index)) is not None and memory[1] < need_gb:
        if time.monotonic() >= deadline:
            log.warning("GPU %d still has only %.1f GiB free after %.0fs (need %.1f); starting anyway",
                        index, memory[1], timeout, need_gb)
            return
        await asyncio.sleep(interval)


def gpu_bytes_by_pid() -> dict[int, int] | None:
    """GPU memory each process uses now, over every GPU (NVML); None when it cannot be read, or
    cannot be trusted (``blind_view``). A process whose usage NVML cannot measure is absent."""
    per_gpu = processes_by_gpu(None)
    return None if per_gpu is None else _summed(per_gpu)


def _summed(per_gpu: dict[int, dict[int, int]]) -> dict[int, int]:
    used: dict[int, int] = {}
    for held in per_gpu.values():
        for pid, size in held.items():
            used[pid] = used.get(pid, 0) + size
    return used


def processes_by_gpu(indices: list[int] | None) -> dict[int, dict[int, int]] | None:
    """For each GPU of ``indices`` (None: every one), the memory each process holds there (pid: bytes);
    None when NVML cannot be read, or its per-process view cannot be trusted (``blind_view``)."""
    nvml = _nvml()
    if nvml is None:
        return None
    per_gpu: dict[int, dict[int, int]] = {}
    device_used = 0
    try:
        for index in range(nvml.nvmlDeviceGetCount()) if indices is None else indices:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            device_used += int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
            per_gpu[index] = _held_on(nvml, handle)
    except Exception as exc:
        log.debug("NVML could not list GPU processes: %s", exc)
        return None
    return None if blind_view(_summed(per_gpu), device_used) else per_gpu


def _held_on(nvml: Any, handle: Any) -> dict[int, int]:
    """What each process holds on one GPU: its compute and graphics contexts (a process with both is listed
    in each, with the same figure: counted once)."""
    lists = [nvml.nvmlDeviceGetComputeRunningProcesses]
    if hasattr(nvml, "nvmlDeviceGetGraphicsRunningProcesses"):  # a display server, a desktop's compositor
        lists.append(nvml.nvmlDeviceGetGraphicsRunningProcesses)
    held: dict[int, int] = {}
    for running in lists:
        for proc in running(handle):
            if proc.usedGpuMemory is not None:
                held[proc.pid] = max(held.get(proc.pid, 0), int(proc.usedGpuMemory))
    return held


def blind_view(by_pid: dict[int, int], device_used: int, pid_exists: Callable[[int], bool] = psutil.pid_exists
               ) -> bool:
    """Whether NVML's per-process view is blind here: the devices hold memory (beyond the driver's
    own, ``_BLIND_FLOOR``) but none of it is charged to a process this PID namespace can see.

    Inside a container NVML can report the host's PIDs (NVIDIA/nvidia-docker#1483) or 0 bytes per
    process; summing such a view gives 0 for every service, before and after a park alike.
    """
    visible = sum(used for pid, used in by_pid.items() if pid_exists(pid))
    if visible == 0 and device_used > _BLIND_FLOOR:
        global _warned_blind
        if not _warned_blind:
            _warned_blind = True
            log.warning("NVML charges the GPUs' %.1f GiB to no process visible here (a container's PID "
                        "namespace?): per-model GPU memory is unknown; parks are checked on the devices' "
                        "free memory instead", device_used / _GIB)
        return True
    return False


def device_used_bytes(indices: list[int]) -> dict[int, int] | None:
    """Memory in use on each of the GPUs ``indices`` (NVML's device view); None when it cannot be read."""
    nvml = _nvml()
    return None if nvml is None else _used_on(nvml, indices)


def gpu_used_bytes() -> int | None:
    """Memory in use on every GPU together (NVML's device view, which containers do not hide)."""
    nvml = _nvml()
    used = None if nvml is None else _used_on(nvml, None)
    return None if used is None else sum(used.values())


def _used_on(nvml: Any, indices: list[int] | None) -> dict[int, int] | None:
    """Memory in use per GPU of ``indices`` (None: every GPU NVML lists); None when it cannot be read."""
    try:
        chosen = range(nvml.nvmlDeviceGetCount()) if indices is None else indices
        return {i: int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).used) for i in chosen}
    except Exception as exc:
        log.debug("NVML could not read the GPUs' memory: %s", exc)
        return None

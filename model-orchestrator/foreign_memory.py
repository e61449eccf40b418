"""GPU memory that processes not the orchestrator's hold, so placement avoids the GPUs they crowd.

Placement (placement.py) counts what models.yaml declares. A notebook's kernel or a second server
holding 20 GB of GPU 0 is invisible to that count: a model placed there would wait for memory that
never frees, then run out of it. So every few seconds the orchestrator reads NVML's processes per
GPU and charges to others what no process of its own holds. Its own are its descendants now (every
service, vLLM's engine cores, the reaper) and those seen within ``RECENT_S``: a stopped service's
memory can still show for a moment after it exits. Where NVML's per-process view is blind to this
PID namespace (a container shown the host's PIDs) nothing is charged: placement stays as declared.

Mechanism here (reading, remembering pids); the pure parts (``foreign_gb``, ``with_others``) are tested alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence

import psutil

from core.host.gpu import processes_by_gpu
from model_orchestrator.placement import Device

log = logging.getLogger(__name__)

GIB = 1024**3
INTERVAL_S = 2.0  # how often NVML is read (off the event loop)
RECENT_S = 30.0  # how long a pid that was ours is still taken as ours
NOISE_GB = 0.25  # less than this held by others is not worth steering for (a driver's bookkeeping)


def foreign_gb(per_gpu: Mapping[int, Mapping[int, int]], ours: Collection[int]) -> dict[int, float]:
    """GiB held on each GPU by processes not in ``ours``."""
    return {index: sum(size for pid, size in held.items() if pid not in ours) / GIB for index, held in per_gpu.items()}


def with_others(devices: Sequence[Device], foreign: Mapping[int, float]) -> list[Device]:
    """``devices`` with what others hold on each (``Device.others_gb``); 0 below the noise."""
    return [dataclasses.replace(d, others_gb=held if (held := foreign.get(d.index, 0.0)) >= NOISE_GB else 0.0)
            for d in devices]


def own_pids(root: int | None = None) -> set[int]:
    """This process (or ``root``) and every descendant."""
    try:
        me = psutil.Process(root or os.getpid())
        return {me.pid, *(child.pid for child in me.children(recursive=True))}
    except psutil.Error:
        return set()


class ForeignMemory:
    """Reads what others hold on the placement GPUs, and hands the coordinator its GPUs with it (``apply``)."""

    def __init__(self, devices: Sequence[Device], apply: Callable[[list[Device]], None],
                 read: Callable[[list[int]], dict[int, dict[int, int]] | None] = processes_by_gpu,
                 ours: Callable[[], set[int]] = own_pids, clock: Callable[[], float] = time.monotonic) -> None:
        self.devices = list(devices)
        self._apply, self._read, self._ours, self._clock = apply, read, ours, clock
        self._seen: dict[int, float] = {}  # pid -> when it was last one of ours
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def read(self) -> dict[int, float]:
        """GiB others hold on each GPU now (blocking: NVML); none where NVML cannot say."""
        now = self._clock()
        for pid in self._ours():
            self._seen[pid] = now
        self._seen = {pid: at for pid, at in self._seen.items() if now - at <= RECENT_S}
        per_gpu = self._read([device.index for device in self.devices])
        return {} if per_gpu is None else foreign_gb(per_gpu, self._seen)

    def rebase(self, devices: Sequence[Device]) -> None:
        """New budgets for the same GPUs (a reload): handed over at once, with the last reading of others."""
        self.devices = list(devices)
        self._apply(with_others(self.devices, self._last))

    def update(self, foreign: Mapping[int, float]) -> None:
        """Hand the coordinator the GPUs with ``foreign`` when it changed by a tenth of a GB (on the event loop)."""
        if _rounded(foreign) == _rounded(self._last):
            return
        self._last = dict(foreign)
        self._apply(with_others(self.devices, foreign))
        log.info("GPU memory held by other processes: %s", ", ".join(
            f"GPU {index} {held:.1f} GB" for index, held in sorted(foreign.items()) if held >= NOISE_GB) or "none")

    def start(self) -> None:
        if self.devices and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="foreign-gpu-memory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                self.update(await asyncio.to_thread(self.read))
            except Exception:  # a reading that fails leaves the last one; the next may work
                log.exception("reading GPU memory held by other processes failed")
            await asyncio.sleep(INTERVAL_S)


def _rounded(foreign: Mapping[int, float]) -> dict[int, float]:
    """What is worth re-placing for: tenths of a GB above the noise."""
    return {index: round(held, 1) for index, held in foreign.items() if held >= NOISE_GB}

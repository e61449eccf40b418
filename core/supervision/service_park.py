"""Parking and restoring one managed service: the tasks ``ManagedService.park()``/``restore()`` run.

Each ends in exactly one way: the state it aimed for, or a stop when it failed (the next start
is then cold), recorded in the service's ``ParkRecord`` so ``/status`` shows what happened. A park
also fails when the GPU memory was not given back, per NVML (a process tree that still holds
over half of what it held, and over ``_STILL_HELD_BYTES``): keeping a process that frees nothing
would only block the model it made room for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Protocol

import psutil

from core.common.aio import wait_all
from core.config.schema import ModelSpec
from core.host.gpu import gpu_bytes_by_pid, gpu_used_bytes
from core.supervision.park_client import ParkClient, ParkFailed, ParkUnsupported
from core.supervision.service_state import ParkRecord, ServiceState

log = logging.getLogger(__name__)

_STILL_HELD_BYTES = 2 * 1024**3  # CUDA context, vLLM's kept CUDA graphs: some memory always stays


class Parked(Protocol):
    """What a park or restore uses of a service: ``ManagedService`` is one (typed, not imported:
    the service calls these, so importing it back would be a circle)."""

    spec: ModelSpec
    parker: ParkClient
    park_record: ParkRecord

    @property
    def name(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    def park_settled(self, new: ServiceState, reason: str) -> bool: ...
    def park_failed(self, reason: str) -> None: ...


async def run_park(svc: Parked, level: int, after: list[Awaitable[object]]) -> None:
    await wait_all(after)  # the parked models stopped to make host room for this one go first
    try:
        before = await asyncio.to_thread(gpu_held, svc.pid)  # NVML blocks: never on the loop
        outcome = await svc.parker.park(level)
        _check_freed(before, await asyncio.to_thread(gpu_held, svc.pid), svc.spec.vram_gb)
    except ParkUnsupported as exc:
        svc.park_record = replace(svc.park_record, unsupported=str(exc))
        svc.park_failed(f"cannot park: {exc}")
        return
    except Exception as exc:  # ParkFailed, or a bug: either way the park is over and the service stops
        _park_failed(svc, f"park failed: {_reason(exc)}")
        return
    svc.park_record = replace(svc.park_record, parks=svc.park_record.parks + 1, level=level,
                              host_bytes=outcome.host_bytes, seconds=outcome.seconds, last_error=None)
    svc.park_settled(ServiceState.PARKED, f"level {level} in {outcome.seconds:.2f}s")


async def run_restore(svc: Parked, after: list[Awaitable[object]]) -> None:
    await wait_all(after)  # the models it evicts are parked or stopped first
    level = svc.park_record.level or svc.spec.park.level
    try:
        outcome = await svc.parker.restore(level)
    except Exception as exc:  # ParkFailed, or a bug: never left RESTORING (it holds its GPU share)
        _park_failed(svc, f"restore failed: {_reason(exc)}")
        return
    svc.park_record = replace(svc.park_record, restores=svc.park_record.restores + 1, level=None,
                              host_bytes=outcome.host_bytes, seconds=outcome.seconds, last_error=None)
    svc.park_settled(ServiceState.READY, f"restored in {outcome.seconds:.2f}s")


def _reason(exc: Exception) -> str:
    if isinstance(exc, ParkFailed):
        return str(exc)
    log.error("unexpected error while parking or restoring", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def _park_failed(svc: Parked, reason: str) -> None:
    log.error("%s: %s; stopping it (it starts cold next time)", svc.name, reason)
    svc.park_record = replace(svc.park_record, failures=svc.park_record.failures + 1, last_error=reason, level=None)
    svc.park_failed(reason)


@dataclass(frozen=True)
class Held:
    """GPU memory as NVML shows it: the service's process tree's, or (``device``) when the per-process
    view is blind (core/host/gpu.py ``blind_view``), every device's in total."""

    bytes: int
    device: bool = False


def gpu_held(pid: int | None) -> Held | None:
    """What ``pid``'s tree holds, else the devices' total when NVML cannot see processes; None without NVML."""
    tree = gpu_bytes_of_tree(pid)
    if tree is not None:
        return Held(tree)
    total = gpu_used_bytes()
    return None if total is None or pid is None else Held(total, device=True)


def _check_freed(before: Held | None, after: Held | None, vram_gb: float | None) -> None:
    """ParkFailed when the park did not give its GPU memory back, as far as NVML can tell."""
    if before is None or after is None or before.device != after.device:
        return  # no NVML (CPU, or no driver), or its view changed meanwhile: nothing to check against
    gib = 1024**3
    if not before.device:
        if after.bytes > _STILL_HELD_BYTES and after.bytes > before.bytes / 2:
            raise ParkFailed(f"the GPU memory was not given back: {after.bytes / gib:.1f} GiB still in use "
                             f"(was {before.bytes / gib:.1f} GiB)")
        return
    # Device totals include the other models: the park must free at least half of its declared share.
    freed = before.bytes - after.bytes
    if vram_gb and freed < vram_gb * gib / 2:
        raise ParkFailed(f"the GPU memory was not given back: the devices freed {freed / gib:.1f} GiB of its "
                         f"{vram_gb:g} GB (NVML sees no processes here; device totals used)")


def gpu_bytes_of_tree(pid: int | None, by_pid: dict[int, int] | None = None) -> int | None:
    """GPU memory (NVML; ``by_pid`` if read already) used by ``pid`` and its descendants (vLLM's
    engine core is a child); None without NVML or a process."""
    if pid is None:
        return None
    by_pid = gpu_bytes_by_pid() if by_pid is None else by_pid
    if by_pid is None:
        return None
    try:
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return None
    return sum(by_pid.get(p, 0) for p in pids)

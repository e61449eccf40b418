"""Parking, inside a model service: give the GPU memory back while the process stays, and restore.

A parked service keeps its process (interpreter, imports, CUDA context, compiled kernels) and
either its weights in host memory (level 1) or nothing (level 2: weights reloaded from disk on
restore). Restoring is then seconds instead of a cold start's minutes. The orchestrator decides
when (model-orchestrator/scheduler.py); a service only carries it out, over three routes that
``BaseService`` mounts behind its service token:

* ``GET /state``: ``{"state", "level", "vram_bytes", "pinned_host_bytes", "can_park", "reason"}``
* ``POST /offload?level=1|2``: stop admitting requests (503 "parked"), let the ones in
  progress finish, run the service's ``offload(level)`` hook, give cached GPU blocks back;
  answers the state afterwards plus ``seconds``. 501 when this service cannot park (the
  orchestrator then stops it instead), 409 unless it is ready.
* ``POST /restore``: run ``restore()`` then ``after_restore()`` (e.g. a one-token warm-up);
  409 unless parked.

A hook that raises leaves the model in an unknown state, so the service turns fatal (exits
non-zero); the orchestrator sees the failed call and falls back to a cold start.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse

from core.common.errors import ServiceError
from core.host.memory_share import release_cached_memory
from core.runtime.health import Health

log = logging.getLogger(__name__)

class ParkLevel(enum.IntEnum):
    WEIGHTS_IN_HOST = 1  # weights wait in (pinned) host memory; restore is one copy back
    WEIGHTS_DROPPED = 2  # weights dropped; restore reloads them from disk into the kept process


@dataclass(frozen=True)
class MemoryUse:
    """What a service's model holds now (``BaseService.memory_use()``)."""

    vram_bytes: int = 0  # on the GPU (0 on CPU)
    host_bytes: int | None = 0  # host memory kept for a restore (the host copy; pinned with CUDA); None: unknown


class Parkable(Protocol):
    """What parking uses of a service: ``BaseService`` is one (typed here, not imported, so the
    base class can mount these routes without an import circle)."""

    name: str
    health: Health
    parked_level: ParkLevel | None
    options: Any  # the parsed command line: --drain-timeout

    def memory_use(self) -> MemoryUse: ...
    def park_unsupported(self, level: ParkLevel | None = None) -> str | None: ...
    def offload(self, level: ParkLevel) -> Awaitable[None]: ...
    def restore(self) -> Awaitable[None]: ...
    def after_restore(self) -> Awaitable[None]: ...
    async def requests_drained(self, timeout: float) -> bool: ...
    def requests_in_progress(self) -> int: ...
    def fatal(self, reason: str) -> None: ...


class ParkUnsupported(Exception):
    """This service, or its engine on this platform, cannot park: the orchestrator stops it instead."""


def state_body(service: Parkable) -> dict[str, Any]:
    """The ``/state`` answer."""
    use = service.memory_use()
    reason = service.park_unsupported()
    return {"state": service.health.value, "level": service.parked_level, "vram_bytes": use.vram_bytes,
            "pinned_host_bytes": use.host_bytes, "can_park": reason is None, "reason": reason}


async def park(service: Parkable, level: ParkLevel, drain_timeout: float) -> float:
    """Park ``service`` at ``level``; the seconds it took. Raises ParkUnsupported or ServiceError(409)."""
    reason = service.park_unsupported(level)
    if reason is not None:
        raise ParkUnsupported(reason)
    if service.health is not Health.READY:
        raise ServiceError(409, f"{service.name} is {service.health.value}, not ready: nothing to park",
                           "not_ready")
    began = time.monotonic()
    service.health = Health.PARKING  # the readiness gate refuses new requests from here on
    await _drain(service, drain_timeout)
    await _run_hook(service, "offload", service.offload(level))
    release_cached_memory()
    service.parked_level = level
    service.health = Health.PARKED
    seconds = time.monotonic() - began
    log.info("%s: parked at level %d in %.2fs", service.name, level, seconds)
    return seconds


async def restore(service: Parkable) -> float:
    """Bring a parked ``service`` back to ready; the seconds it took. Raises ServiceError(409)."""
    if service.health is not Health.PARKED:
        raise ServiceError(409, f"{service.name} is {service.health.value}, not parked", "not_parked")
    began = time.monotonic()
    service.health = Health.RESTORING
    await _run_hook(service, "restore", service.restore())
    await _run_hook(service, "after_restore", service.after_restore())
    service.parked_level = None
    service.health = Health.READY
    seconds = time.monotonic() - began
    log.info("%s: restored in %.2fs", service.name, seconds)
    return seconds


async def _drain(service: Parkable, timeout: float) -> None:
    """Wait for requests already admitted to end (the orchestrator parks idle services, but an
    admin's /upstream call may still be running); past ``timeout``, park anyway."""
    if not await service.requests_drained(timeout):
        log.warning("%s: parking with %d request(s) still in progress", service.name, service.requests_in_progress())


async def _run_hook(service: Parkable, hook: str, call: Any) -> None:
    try:
        await call
    except asyncio.CancelledError:
        service.fatal(f"{hook} was interrupted; the model's state is unknown")
        raise
    except Exception as exc:
        log.exception("%s: %s failed", service.name, hook)
        service.fatal(f"{hook} failed: {type(exc).__name__}: {exc}")
        raise ServiceError(500, f"{service.name}: {hook} failed: {type(exc).__name__}: {exc}; "
                           "the service is exiting", f"{hook}_failed") from exc


def mount_park_routes(app: FastAPI, service: Parkable) -> None:
    """``/state``, ``/offload`` and ``/restore`` (see the module's docstring)."""

    @app.get("/state", include_in_schema=False)
    async def state() -> JSONResponse:
        return JSONResponse(state_body(service))

    @app.post("/offload", include_in_schema=False)
    async def offload(level: int = Query(1, ge=1, le=2)) -> JSONResponse:
        try:
            seconds = await park(service, ParkLevel(level), service.options.drain_timeout)
        except ParkUnsupported as exc:
            raise ServiceError(501, str(exc), "park_unsupported") from None
        return JSONResponse({**state_body(service), "seconds": round(seconds, 4)})

    @app.post("/restore", include_in_schema=False)
    async def restore_route() -> JSONResponse:
        seconds = await restore(service)
        return JSONResponse({**state_body(service), "seconds": round(seconds, 4)})

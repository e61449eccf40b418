"""Hang detection for READY services: a health probe every ``health_interval`` seconds.

A crash is noticed at once (the leader exits, see ``ManagedService._watch_exit``); a hang
is not: a SIGSTOPped process or a wedged engine keeps its pid and its port, and requests
to it only time out. So while a service is READY a task probes its health endpoint, off
the request path; after ``health_failures`` failed probes in a row the service counts as
hung (``ManagedService.hung``): it is killed and recorded as a failure, like a crash, and
the next request starts it again.

The task holds the service only through a weak reference between probes, and ends as
soon as the service is gone or no longer READY (``ManagedService`` also cancels it when it
leaves READY), so a watch never keeps a service, or a stopped manager, in memory.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Protocol

from core.supervision.process_tree import out_of_fds
from core.supervision.service_state import ServiceState

log = logging.getLogger(__name__)

_MAX_PROBE_TIMEOUT = 5.0  # seconds; a healthy service answers /health in milliseconds


class Watched(Protocol):
    """What the watch uses of a service: ``ManagedService`` is one (typed, not imported: no circle)."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> ServiceState: ...
    async def probe(self, timeout: float) -> bool: ...
    def hung(self, reason: str) -> None: ...


def start_health_watch(svc: Watched, interval: float, failures: int) -> asyncio.Task[None] | None:
    """Start watching ``svc`` (READY now); None when probing is off (``interval`` 0)."""
    if interval <= 0:
        return None
    return asyncio.create_task(_watch(weakref.ref(svc), interval, failures), name=f"health:{svc.name}")


async def _watch(ref: weakref.ref[Watched], interval: float, failures: int) -> None:
    misses: int | None = 0
    while misses is not None:
        await asyncio.sleep(interval)
        misses = await _check(ref, misses, min(_MAX_PROBE_TIMEOUT, interval), failures)


async def _check(ref: weakref.ref[Watched], misses: int, timeout: float, failures: int) -> int | None:
    """Probe once; return the failed probes in a row so far, or None when the watch is over."""
    svc = ref()  # a strong reference only for the length of one probe
    if svc is None or svc.state is not ServiceState.READY:
        return None
    try:
        healthy = await svc.probe(timeout=timeout)
    except Exception as exc:  # our own trouble (e.g. out of file descriptors) says nothing about the service
        log.warning("%s: health probe not done: %s", svc.name, exc, exc_info=not out_of_fds(exc))
        return misses
    if healthy:
        if misses:
            log.info("%s: health probe answered again after %d failures", svc.name, misses)
        return 0
    misses += 1
    if misses < failures:
        log.warning("%s: health probe failed (%d of %d in a row)", svc.name, misses, failures)
        return misses
    svc.hung(f"hung: {misses} health probes failed in a row")
    return None

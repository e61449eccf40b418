"""The lifecycle of one managed service: one enum, one table of legal transitions.

    STOPPED ──start──▶ STARTING ──healthy──▶ READY ──stop──▶ STOPPING ──exited──▶ STOPPED
       ▲                  │  └──failed (retry later)──▶ STOPPED                      │
       │                  └──failed too often──▶ FAILED ◀──crashed too often── READY
       └────────────── reset / cooldown over ─────┘

Parking (warm swap) keeps the process and gives its GPU memory back:

    READY ──park──▶ PARKING ──parked──▶ PARKED ──restore──▶ RESTORING ──restored──▶ READY
                       └──failed──▶ STOPPING ◀──stop / failed──┘ (and from PARKED: stop, ttl)

A failed park or restore stops the service (its next start is cold). A crash while READY,
PARKING, PARKED or RESTORING goes to STOPPED (the next request restarts it, after a backoff)
or to FAILED when the restart policy gives up. Only ``ManagedService._transition``
changes a state, and it refuses any edge not listed here. ``ServiceSnapshot`` is what the
rest of the orchestrator may read of a service at one instant.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config.schema import ModelSpec


class ServiceState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    PARKING = "parking"
    PARKED = "parked"
    RESTORING = "restoring"

    @property
    def holds_memory(self) -> bool:
        """Whether a service in this state may hold GPU memory (process spawned or about to be)."""
        return self in _HOLDS_GPU

    @property
    def has_process(self) -> bool:
        """Whether a service in this state has a live process that may crash."""
        return self in _HAS_PROCESS


_HOLDS_GPU = frozenset({ServiceState.STARTING, ServiceState.READY, ServiceState.STOPPING, ServiceState.PARKING,
                        ServiceState.RESTORING})
_HAS_PROCESS = frozenset({ServiceState.READY, ServiceState.PARKING, ServiceState.PARKED, ServiceState.RESTORING})
_GONE = frozenset({ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED})  # stop, crash, give up


ALLOWED_TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    ServiceState.STOPPED: frozenset({ServiceState.STARTING, ServiceState.FAILED}),
    ServiceState.STARTING: frozenset(
        {ServiceState.READY, ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED}
    ),
    ServiceState.READY: frozenset({ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED,
                                   ServiceState.PARKING}),
    ServiceState.PARKING: _GONE | {ServiceState.PARKED},
    ServiceState.PARKED: _GONE | {ServiceState.RESTORING},
    ServiceState.RESTORING: _GONE | {ServiceState.READY},
    ServiceState.STOPPING: frozenset({ServiceState.STOPPED, ServiceState.FAILED}),
    ServiceState.FAILED: frozenset({ServiceState.STOPPED, ServiceState.STARTING}),
}


class IllegalTransition(RuntimeError):
    """A bug: code tried a state change the lifecycle does not allow."""


def check_transition(name: str, old: ServiceState, new: ServiceState) -> None:
    if new not in ALLOWED_TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[old]))
        raise IllegalTransition(f"{name}: cannot go from {old.value} to {new.value} (allowed: {allowed})")


@dataclass(frozen=True)
class ServiceSnapshot:
    """One service at one instant, as the control plane shows it (``ManagedService.snapshot()``)."""

    spec: ModelSpec  # the configuration: port, vram_gb, ttl, aliases, ...
    state: ServiceState
    pid: int | None
    in_flight: int  # requests being served now
    last_used: float  # time.monotonic() a request last began or ended, or the service became ready; 0: never
    started_at: float | None  # time.time() of the last READY
    restarts: int
    failures: int  # failures on record for the restart policy
    last_error: str | None
    command: tuple[str, ...]  # the command line, secrets masked
    park: ParkRecord  # parks and restores so far, what the last one held and took
    devices: tuple[int, ...] = ()  # the GPUs it holds memory on (or is parked on); (): none, or not placed

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class ParkRecord:
    """What parking has done for one service (``/status``); replaced, never mutated."""

    parks: int = 0
    restores: int = 0
    failures: int = 0  # parks or restores that failed and fell back to a stop
    level: int | None = None  # while PARKED
    host_bytes: int | None = None  # host memory the service reported holding after its last park
    seconds: float | None = None  # how long the last park or restore took
    last_error: str | None = None
    unsupported: str | None = None  # why this service cannot park (it answered 501): it is stopped instead

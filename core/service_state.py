"""The lifecycle of one managed service: one enum, one table of legal transitions.

    STOPPED ──start──▶ STARTING ──healthy──▶ READY ──stop──▶ STOPPING ──exited──▶ STOPPED
       ▲                  │  └──failed (retry later)──▶ STOPPED                      │
       │                  └──failed too often──▶ FAILED ◀──crashed too often── READY
       └────────────── reset / cooldown over ─────┘

A crash while READY goes to STOPPED (the next request restarts it, after a backoff)
or to FAILED when the restart policy gives up. Only ``ManagedService._transition``
changes a state, and it refuses any edge not listed here. ``ServiceSnapshot`` is what the
rest of the orchestrator may read of a service at one instant.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.config import ModelSpec


class ServiceState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"

    @property
    def holds_memory(self) -> bool:
        """Whether a service in this state may hold GPU memory (process spawned or about to be)."""
        return self in (ServiceState.STARTING, ServiceState.READY, ServiceState.STOPPING)


ALLOWED_TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    ServiceState.STOPPED: frozenset({ServiceState.STARTING, ServiceState.FAILED}),
    ServiceState.STARTING: frozenset(
        {ServiceState.READY, ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED}
    ),
    ServiceState.READY: frozenset({ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.FAILED}),
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

    @property
    def name(self) -> str:
        return self.spec.name

"""What the scheduler may know about each model at one instant: ``ModelView``, a frozen snapshot
the coordinator takes and the pure policy (scheduler.py, placement.py) decides over."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

from core.config.schema import ModelSpec
from core.host.memory_share import GIB
from core.supervision.service_state import ServiceState

READY, STARTING, STOPPING, FAILED = (
    ServiceState.READY, ServiceState.STARTING, ServiceState.STOPPING, ServiceState.FAILED,
)
PARKING, PARKED, RESTORING = ServiceState.PARKING, ServiceState.PARKED, ServiceState.RESTORING


class Servable(Protocol):
    """What ``can_serve_now`` reads: a ``ModelView``, or a live service on the hot path."""

    @property
    def state(self) -> ServiceState: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def max_concurrency(self) -> int | None: ...
    @property
    def retiring(self) -> bool: ...


Policy = Literal["pack", "spread"]


@dataclass(frozen=True)
class Want:
    """Where a model may be placed: ``count`` GPUs of one kind (tensor parallel), only ``allowed``
    ones when it is pinned to some, chosen by ``policy`` (pack: best fit, keeping large holes for
    large models; spread: most free)."""

    count: int = 1
    allowed: frozenset[int] | None = None
    policy: Policy = "pack"


@dataclass(frozen=True)
class ModelView:
    """What the scheduler may know about one model at one instant."""

    name: str
    state: ServiceState
    vram_gb: float | None = None  # None: needs the whole GPU
    pinned: bool = False
    in_flight: int = 0
    last_used: float = 0.0
    max_concurrency: int | None = None
    oldest_waiter: float | None = None  # arrival time of the oldest request waiting for it
    failed_until: float = 0.0
    parkable: bool = False  # it can park (and has not said it cannot)
    host_gb: float = 0.0  # host memory it holds now (parked, or the host copy a park left behind)
    park_host_gb: float | None = None  # host memory it would hold parked; None: unknown
    ttl: float = 0.0  # stop after this many idle seconds (0: never)
    park_idle: float = 0.0  # park after this many idle seconds (0: only to make room)
    overhead_gb: float = 0.0  # GPU memory its process holds beyond vram_gb (its CUDA context), parked too
    kept_gb: float = 0.0  # GPU memory it keeps parked besides that (vLLM's CUDA graphs)
    devices: tuple[int, ...] = ()  # the GPUs it holds memory on now (or parked on); (): the first one
    want: Want = field(default_factory=Want)  # where it may be placed
    retiring: bool = False  # a reload restarts or removes it once its requests finish: it takes no new one

    @property
    def claim_gb(self) -> float:
        """GPU memory it holds, or may hold, in its state: its share and its process's overhead while it
        runs; parked, only that overhead and what a park keeps."""
        if self.state is PARKED:
            return self.parked_claim_gb
        if not self.state.holds_memory:
            return 0.0
        return math.inf if self.vram_gb is None else self.vram_gb + self.overhead_gb

    @property
    def parked_claim_gb(self) -> float:
        """What it would keep on the GPU parked: its process's overhead and what a park keeps."""
        return self.overhead_gb + self.kept_gb

    @property
    def idle(self) -> bool:
        return self.state is READY and self.in_flight == 0


def park_host_gb(spec: ModelSpec, measured_bytes: int | None) -> float | None:
    """Host memory parking ``spec`` would hold: none at level 2; else what it reported last time,
    the declared park.host_gb, the weights' size or its vram_gb; None when nothing says."""
    if spec.park.level == 2:
        return 0.0
    if measured_bytes is not None:  # a service that under-reports (0: "unknown") never undercuts the declared size
        return max(measured_bytes / GIB, spec.park.host_gb or 0.0)
    for value in (spec.park.host_gb, spec.weights.size_gb if spec.weights else None, spec.vram_gb):
        if value is not None:
            return value
    return None


def why_not_parkable(view: ModelView, unsupported: str | None, host_budget_gb: float | None) -> str:
    """Why an operator cannot park ``view``'s model now (``unsupported``: what the service said when it
    could not park)."""
    if not view.parkable:
        return unsupported or "it cannot park"
    if view.state is not READY:
        return f"it is {view.state.value}"
    if not view.idle or view.oldest_waiter is not None:
        return "requests are using or awaiting it"
    if host_budget_gb == 0:
        return "parking is off (settings.host_memory_gb: 0)"
    needs = "an unknown amount" if view.park_host_gb is None else f"{view.park_host_gb:g} GB"
    return (f"parked it would hold {needs} of host memory, more than the host budget "
            f"({host_budget_gb:g} GB, settings.host_memory_gb) has room for")

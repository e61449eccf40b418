"""What must happen for a request to model M: pure decisions over a snapshot, no I/O.

The coordinator takes a snapshot of every model (``ModelView``), asks ``plan()`` and
carries the decision out, then asks again whenever anything changes. Rules:

* M ready → serve now (``can_serve_now``), unless it is at ``max_concurrency`` or *closing* for this
  request: another model W needs M's memory and W's oldest request had waited
  ``batch_window`` before this request arrived. Requests that arrived earlier are
  part of M's current batch and are served; later ones wait while M drains and is
  evicted. So every waiter of a model is served by one load, and no model can starve
  another for more than the window.
* M starting → join that start (one load serves every waiter).
* M stopped → find the models to evict so M's ``vram_gb`` fits the budget: models
  about to stop first, then idle ones least recently used first, then busy ones;
  never pinned ones. A model without ``vram_gb`` needs the whole GPU. If every victim
  is idle and has no request of its current batch still waiting → start now; else
  wait for them to drain.
* M failed and cooling down → refuse with Retry-After.
* M parked (process kept, GPU memory given back) → restore it, evicting as for a start:
  restoring takes seconds where a start takes minutes. M parking → wait; M restoring → join.
* Each victim is parked instead of stopped when it can park and host memory allows
  (``park_or_stop``): what it would hold fits the host budget, if need be after stopping parked
  models used less recently than it. Parked models hold host memory, not GPU memory.

Refusals carry a ``Reason`` (model_orchestrator/refusals.py), never an HTTP status: the
edge that answers the client maps it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from core.host.memory_share import WHOLE_GPU_UTILIZATION
from core.supervision.service_state import ServiceState
from model_orchestrator.refusals import Reason

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


@dataclass(frozen=True)
class Serve:
    pass


@dataclass(frozen=True)
class Join:
    pass


@dataclass(frozen=True)
class Start:
    evict: tuple[str, ...] = ()  # stopped, or parked when named in ``park`` too
    park: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restore:
    evict: tuple[str, ...] = ()
    park: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Reject:
    reason: Reason
    message: str
    retry_after: float | None = None


Decision = Serve | Join | Start | Restore | Wait | Reject


def can_serve_now(view: Servable) -> bool:
    """Ready with a free slot: the Serve rule of ``plan()``, short of batching.

    With no request waiting for any model nothing can be closing (``closing_for`` needs a
    waiter), so then this alone is ``plan()``'s answer: the coordinator's per-request fast
    path asks only this, on the live service, without building a snapshot.
    """
    return view.state is READY and (view.max_concurrency is None or view.in_flight < view.max_concurrency)


def plan(
    target: str,
    views: Mapping[str, ModelView],
    budget_gb: float | None,
    now: float,
    batch_window: float,
    arrival: float | None = None,
    host_budget_gb: float | None = 0.0,
) -> Decision:
    """The next step towards serving one request for ``target`` that arrived at ``arrival``.

    ``host_budget_gb``: host memory parked models may hold (None: unlimited; 0: never park).
    """
    view = views[target]
    if view.state is FAILED and now < view.failed_until:
        return Reject(Reason.COOLING_DOWN, f"model {target!r} failed repeatedly and is cooling down",
                      retry_after=view.failed_until - now)
    if view.state is READY:
        if not can_serve_now(view):
            return Wait(f"{target} is at max_concurrency ({view.max_concurrency})")
        closer = closing_for(target, views, budget_gb, now if arrival is None else arrival, batch_window)
        return Wait(f"{target} is draining so {closer} can load") if closer else Serve()
    if view.state in (STARTING, RESTORING):
        return Join()
    if view.state in (STOPPING, PARKING):
        return Wait(f"{target} is {view.state.value}")
    return _plan_start(target, views, budget_gb, (view.oldest_waiter or now) + batch_window, host_budget_gb)


def _plan_start(
    target: str, views: Mapping[str, ModelView], budget_gb: float | None, batch_deadline: float,
    host_budget_gb: float | None,
) -> Decision:
    victims = memory_victims(target, views, budget_gb)
    if victims is None:
        return Reject(Reason.NO_FIT, _no_fit_message(target, views, budget_gb))
    blockers = [name for name in victims if not _evictable(views[name], batch_deadline)]
    if blockers:
        return Wait(f"waiting for {', '.join(blockers)} to finish before {target} can load")
    park, host_stops = park_or_stop(victims, views, host_budget_gb, keep=target,
                                    gpu_room=gpu_spare(target, victims, views, budget_gb))
    evict = (*victims, *(name for name in host_stops if name not in victims))
    return Restore(evict, park) if views[target].state is PARKED else Start(evict, park)


def park_or_stop(
    victims: list[str], views: Mapping[str, ModelView], host_budget_gb: float | None, keep: str | None = None,
    gpu_room: float = math.inf,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(victims to park instead of stopping, parked models to stop to make host room for them).

    In eviction order, a parkable victim is parked if what parking adds fits the host budget,
    after stopping (least recently used first) parked models used less recently than it, and what
    it keeps on the GPU parked fits ``gpu_room``; else it is stopped. A park whose size is unknown
    fits only where no other model holds host memory. ``keep`` (the model being restored or
    started) is never stopped for room.
    """
    parked = sorted((v for v in views.values() if v.state is PARKED and not v.pinned and v.name != keep),
                    key=lambda v: v.last_used)
    used = sum(v.host_gb for v in views.values())
    park: list[str] = []
    stops: list[str] = []
    for name in victims:
        view = views[name]
        if not view.parkable or host_budget_gb == 0 or view.state is PARKED:  # a parked victim is stopped
            continue
        if view.parked_claim_gb > gpu_room:  # parked it would keep more GPU memory than the swap leaves
            continue
        room = [p for p in parked if p.name not in stops and p.last_used < view.last_used]
        freed = _host_room(view, used, room, host_budget_gb)
        if freed is not None:
            gpu_room -= view.parked_claim_gb
            park.append(name)
            stops += freed
            used += _park_adds(view) - sum(views[p].host_gb for p in freed)
    return tuple(park), tuple(stops)


def park_room(name: str, views: Mapping[str, ModelView], host_budget_gb: float | None) -> tuple[str, ...] | None:
    """Whether ``name`` may park now: the parked models to stop first so it fits the host budget
    (often none), or None when it cannot park (it cannot, parking is off, or no room can be made).
    The one rule for every park: an eviction's (``park_or_stop``), the idle timer's, an operator's."""
    park, stops = park_or_stop([name], views, host_budget_gb)
    return stops if park == (name,) else None


def _park_adds(view: ModelView) -> float:
    """Host memory parking ``view`` adds to what it holds already (a kept host copy costs nothing)."""
    return max(0.0, (view.park_host_gb if view.park_host_gb is not None else math.inf) - view.host_gb)


def _host_room(view: ModelView, used: float, room: list[ModelView], budget: float | None) -> list[str] | None:
    """The parked models (from ``room``, in order) to stop so parking ``view`` fits; None: it cannot."""
    if budget is None:
        return []
    adds = _park_adds(view)
    if adds == math.inf:  # unknown size: only alone
        return [p.name for p in room] if used - sum(p.host_gb for p in room) == 0 else None
    chosen: list[str] = []
    for candidate in [None, *room]:
        if candidate is not None:
            chosen.append(candidate.name)
            used -= candidate.host_gb
        if used + adds <= budget:
            return chosen
    return None


def memory_victims(
    target: str, views: Mapping[str, ModelView], budget_gb: float | None
) -> list[str] | None:
    """The models to evict (park or stop) so ``target`` fits, in eviction order; None if it never can.
    With a budget, parked models count with what they keep on the GPU, and may be stopped for it."""
    if budget_gb is None:  # no memory accounting; only whole-GPU models conflict
        others = [v for v in views.values() if v.name != target and v.state.holds_memory]
        if views[target].vram_gb is None:
            return None if any(v.pinned for v in others) else [v.name for v in sorted(others, key=_evict_order)]
        whole = [v for v in others if v.vram_gb is None]
        return None if any(v.pinned for v in whole) else [v.name for v in whole]
    others = [v for v in views.values() if v.name != target and v.claim_gb > 0]
    target_view = views[target]
    if target_view.vram_gb is None:  # whole GPU: everything else must go
        return None if any(v.pinned for v in others) else [v.name for v in sorted(others, key=_evict_order)]
    need = target_view.vram_gb + target_view.overhead_gb
    candidates = sorted((v for v in others if not v.pinned), key=_evict_order)
    chosen: list[str] = []
    while _free_gb(budget_gb, others, chosen) < need:
        if not candidates:
            return None
        chosen.append(candidates.pop(0).name)
    return chosen


def _evictable(view: ModelView, batch_deadline: float) -> bool:
    """Parked, or idle with none of its waiters arrived before ``batch_deadline`` (they are served first)."""
    if view.state is PARKED:
        return view.oldest_waiter is None or view.oldest_waiter > batch_deadline
    return view.idle and (view.oldest_waiter is None or view.oldest_waiter > batch_deadline)


def _evict_order(view: ModelView) -> tuple[int, float]:
    """Already stopping or parking first (free soon), then idle, then parked (stopping one frees only its
    residue), then busy; least recently used first."""
    rank = 0 if view.state in (STOPPING, PARKING) else 1 if view.idle else 2 if view.state is PARKED else 3
    return rank, view.last_used


def _free_gb(budget_gb: float, others: list[ModelView], evicted: list[str]) -> float:
    used = sum(v.claim_gb for v in others if v.name not in evicted)
    return budget_gb - used


def gpu_spare(target: str, victims: list[str], views: Mapping[str, ModelView], budget_gb: float | None) -> float:
    """GPU memory left once ``target`` runs and every victim is gone: what parks (rather than stops)
    of the victims may keep on the GPU between them."""
    view = views[target]
    if budget_gb is None:
        return math.inf
    others = [v for v in views.values() if v.name != target]
    need = budget_gb * WHOLE_GPU_UTILIZATION if view.vram_gb is None else view.vram_gb  # vLLM's default share
    return _free_gb(budget_gb, others, victims) - need - view.overhead_gb


def closing_for(
    target: str, views: Mapping[str, ModelView], budget_gb: float | None, arrival: float, batch_window: float
) -> str | None:
    """The waiting model (if any) that closes ``target`` to a request arriving at ``arrival``.

    That is a model needing ``target``'s memory whose oldest request had waited
    ``batch_window`` already when this one arrived.
    """
    for other in views.values():
        if other.name == target or other.oldest_waiter is None or other.state in (READY, STARTING, RESTORING):
            continue
        if arrival - other.oldest_waiter < batch_window:
            continue
        victims = memory_victims(other.name, views, budget_gb)
        if victims is not None and target in victims:
            return other.name
    return None


def _no_fit_message(target: str, views: Mapping[str, ModelView], budget_gb: float | None) -> str:
    need = views[target].vram_gb
    pinned = [v.name for v in views.values() if v.pinned and v.name != target and v.claim_gb > 0]
    overhead = views[target].overhead_gb
    wants = "the whole GPU" if need is None else f"{need:g} GB of GPU memory" + (
        f" (+{overhead:g} GB for its process)" if overhead else "")
    budget = "" if budget_gb is None else f" (budget {budget_gb:g} GB)"
    if not pinned:
        return f"model {target!r} needs {wants}, more than the whole budget{budget}"
    return f"model {target!r} needs {wants}{budget}, but pinned models hold it: {', '.join(pinned)}"


IdleAction = Literal["park", "stop"]


class IdleDecision(NamedTuple):
    """What a model's idle timers call for now."""

    action: IdleAction | None
    at: float | None = None  # when to look again (None: no timer pending)
    stops: tuple[str, ...] = ()  # with "park": parked models to stop first for host room (``park_room``)


def idle_action(name: str, views: Mapping[str, ModelView], now: float, host_budget_gb: float | None) -> IdleDecision:
    """What ``name``'s idle timers call for now (``park.idle`` parks, ``ttl`` stops, a parked
    model too), and when they next might; nothing while a request uses or awaits it. A park
    follows the host budget as any park does (``park_room``); one that cannot fit waits for ``ttl``."""
    view = views[name]
    if view.in_flight or view.oldest_waiter is not None or view.state not in (READY, PARKED):
        return IdleDecision(None)
    park_at = view.last_used + view.park_idle if view.park_idle > 0 and view.state is READY else math.inf
    stop_at = view.last_used + view.ttl if view.ttl > 0 else math.inf
    if park_at <= now and park_at < stop_at:
        stops = park_room(name, views, host_budget_gb)
        if stops is not None:
            return IdleDecision("park", None, stops)
    if stop_at <= now:
        return IdleDecision("stop")
    upcoming = min(t for t in (park_at, stop_at, math.inf) if t > now)
    return IdleDecision(None, None if upcoming == math.inf else upcoming)

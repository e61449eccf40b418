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

Refusals carry a ``Reason`` (model_orchestrator/refusals.py), never an HTTP status: the
edge that answers the client maps it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from core.service_state import ServiceState
from model_orchestrator.refusals import Reason

READY, STARTING, STOPPING, FAILED = (
    ServiceState.READY, ServiceState.STARTING, ServiceState.STOPPING, ServiceState.FAILED,
)


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
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Reject:
    reason: Reason
    message: str
    retry_after: float | None = None


Decision = Serve | Join | Start | Wait | Reject


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
) -> Decision:
    """The next step towards serving one request for ``target`` that arrived at ``arrival``."""
    view = views[target]
    if view.state is FAILED and now < view.failed_until:
        return Reject(Reason.COOLING_DOWN, f"model {target!r} failed repeatedly and is cooling down",
                      retry_after=view.failed_until - now)
    if view.state is READY:
        if not can_serve_now(view):
            return Wait(f"{target} is at max_concurrency ({view.max_concurrency})")
        closer = closing_for(target, views, budget_gb, now if arrival is None else arrival, batch_window)
        return Wait(f"{target} is draining so {closer} can load") if closer else Serve()
    if view.state is STARTING:
        return Join()
    if view.state is STOPPING:
        return Wait(f"{target} is stopping")
    return _plan_start(target, views, budget_gb, (view.oldest_waiter or now) + batch_window)


def _plan_start(
    target: str, views: Mapping[str, ModelView], budget_gb: float | None, batch_deadline: float
) -> Decision:
    victims = memory_victims(target, views, budget_gb)
    if victims is None:
        return Reject(Reason.NO_FIT, _no_fit_message(target, views, budget_gb))
    blockers = [name for name in victims if not _evictable(views[name], batch_deadline)]
    if blockers:
        return Wait(f"waiting for {', '.join(blockers)} to finish before {target} can load")
    return Start(tuple(victims))


def memory_victims(
    target: str, views: Mapping[str, ModelView], budget_gb: float | None
) -> list[str] | None:
    """The models to stop so ``target`` fits, in eviction order; None if it never can."""
    others = [v for v in views.values() if v.name != target and v.state.holds_memory]
    need = views[target].vram_gb
    if need is None:  # whole GPU: everything else must go
        return None if any(v.pinned for v in others) else [v.name for v in sorted(others, key=_evict_order)]
    if budget_gb is None:  # no memory accounting; only whole-GPU models conflict
        whole = [v for v in others if v.vram_gb is None]
        return None if any(v.pinned for v in whole) else [v.name for v in whole]
    candidates = sorted((v for v in others if not v.pinned), key=_evict_order)
    chosen: list[str] = []
    while _free_gb(budget_gb, others, chosen) < need:
        if not candidates:
            return None
        chosen.append(candidates.pop(0).name)
    return chosen


def _evictable(view: ModelView, batch_deadline: float) -> bool:
    """Idle, and none of its waiters arrived before ``batch_deadline`` (they are served first)."""
    return view.idle and (view.oldest_waiter is None or view.oldest_waiter > batch_deadline)


def _evict_order(view: ModelView) -> tuple[int, float]:
    """Already stopping first (free soon), then idle, then busy; least recently used first."""
    rank = 0 if view.state is STOPPING else 1 if view.idle else 2
    return rank, view.last_used


def _free_gb(budget_gb: float, others: list[ModelView], evicted: list[str]) -> float:
    used = sum(math.inf if v.vram_gb is None else v.vram_gb for v in others if v.name not in evicted)
    return budget_gb - used


def closing_for(
    target: str, views: Mapping[str, ModelView], budget_gb: float | None, arrival: float, batch_window: float
) -> str | None:
    """The waiting model (if any) that closes ``target`` to a request arriving at ``arrival``.

    That is a model needing ``target``'s memory whose oldest request had waited
    ``batch_window`` already when this one arrived.
    """
    for other in views.values():
        if other.name == target or other.oldest_waiter is None or other.state in (READY, STARTING):
            continue
        if arrival - other.oldest_waiter < batch_window:
            continue
        victims = memory_victims(other.name, views, budget_gb)
        if victims is not None and target in victims:
            return other.name
    return None


def _no_fit_message(target: str, views: Mapping[str, ModelView], budget_gb: float | None) -> str:
    need = views[target].vram_gb
    pinned = [v.name for v in views.values() if v.pinned and v.name != target and v.state.holds_memory]
    wants = "the whole GPU" if need is None else f"{need:g} GB of GPU memory"
    budget = "" if budget_gb is None else f" (budget {budget_gb:g} GB)"
    if not pinned:
        return f"model {target!r} needs {wants}, more than the whole budget{budget}"
    return f"model {target!r} needs {wants}{budget}, but pinned models hold it: {', '.join(pinned)}"

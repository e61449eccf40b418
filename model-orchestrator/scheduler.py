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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from core.host.memory_share import WHOLE_GPU_UTILIZATION
from model_orchestrator.model_view import (
    FAILED,
    PARKED,
    PARKING,
    READY,
    RESTORING,
    STARTING,
    STOPPING,
    ModelView,
    Servable,
    Want,
)
from model_orchestrator.placement import Device, Placement, candidate_sets, evict_order, place, used_gb
from model_orchestrator.refusals import Reason

__all__ = ["ModelView", "Servable", "Want"]  # with the decisions below: what callers import from here

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
    devices: tuple[int, ...] = ()  # the GPUs it goes on (placement.py); (): no GPU accounting


@dataclass(frozen=True)
class Restore:
    evict: tuple[str, ...] = ()
    park: tuple[str, ...] = ()
    devices: tuple[int, ...] = ()  # the GPUs it parked on


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
    return view.state is READY and not view.retiring and (
        view.max_concurrency is None or view.in_flight < view.max_concurrency)


Budget = float | Sequence[Device] | None  # one GPU's GiB, every GPU's budget, or None: no accounting


def plan(
    target: str,
    views: Mapping[str, ModelView],
    budget_gb: Budget,
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
    if view.retiring:  # the reload that changed it stops it once idle; then it starts with its new config
        return Wait(f"{target} restarts with its new config once its requests finish")
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
    target: str, views: Mapping[str, ModelView], budget_gb: Budget, batch_deadline: float,
    host_budget_gb: float | None,
) -> Decision:
    placement = placement_for(target, views, budget_gb)
    if placement is None:
        return Reject(Reason.NO_FIT, _no_fit_message(target, views, budget_gb))
    victims = list(placement.victims)
    blockers = [name for name in victims if not _evictable(views[name], batch_deadline)]
    if blockers:
        return Wait(f"waiting for {', '.join(blockers)} to finish before {target} can load")
    park, host_stops = park_or_stop(victims, views, host_budget_gb, keep=target,
                                    gpu_room=gpu_spare(target, placement, views, budget_gb))
    evict = (*victims, *(name for name in host_stops if name not in victims))
    # A plain GiB budget is one GPU, the default one: nothing to name. A list of GPUs names them.
    devices = placement.devices if isinstance(budget_gb, Sequence) else ()
    if views[target].state is PARKED:
        return Restore(evict, park, devices)
    return Start(evict, park, devices)


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


def devices_of(budget_gb: Budget) -> list[Device] | None:
    """The GPUs to place on: as given, or one GPU of ``budget_gb``; None: no memory accounting."""
    if budget_gb is None:
        return None
    return [Device(0, float(budget_gb))] if isinstance(budget_gb, (int, float)) else list(budget_gb)


def placement_for(target: str, views: Mapping[str, ModelView], budget_gb: Budget) -> Placement | None:
    """Where ``target`` goes and the models to evict (park or stop) first, in eviction order; None if it
    never fits (placement.py). With a budget, parked models count with what they keep on the GPU, and
    may be stopped for it."""
    devices = devices_of(budget_gb)
    if devices is not None:
        return place(target, views, devices)
    # no memory accounting: only whole-GPU models conflict
    others = [v for v in views.values() if v.name != target and v.state.holds_memory]
    if views[target].vram_gb is not None:
        others = [v for v in others if v.vram_gb is None]
    if any(v.pinned for v in others):
        return None
    return Placement((), tuple(v.name for v in sorted(others, key=evict_order)))


def memory_victims(target: str, views: Mapping[str, ModelView], budget_gb: Budget) -> list[str] | None:
    """The models to evict so ``target`` fits, in eviction order; None if it never can."""
    placement = placement_for(target, views, budget_gb)
    return None if placement is None else list(placement.victims)


def _evictable(view: ModelView, batch_deadline: float) -> bool:
    """Parked, or idle with none of its waiters arrived before ``batch_deadline`` (they are served first)."""
    if view.state is PARKED:
        return view.oldest_waiter is None or view.oldest_waiter > batch_deadline
    return view.idle and (view.oldest_waiter is None or view.oldest_waiter > batch_deadline)


def gpu_spare(target: str, placement: Placement, views: Mapping[str, ModelView], budget_gb: Budget) -> float:
    """GPU memory left, on the tightest of ``target``'s GPUs, once it runs and every victim is gone: what
    parks (rather than stops) of the victims may keep on the GPU between them."""
    devices = devices_of(budget_gb)
    if devices is None or not placement.devices:
        return math.inf
    view, by_index = views[target], {d.index: d.within_room() for d in devices}  # others' memory too
    used = used_gb(views, devices, {target, *placement.victims})
    return min(by_index[i].budget_gb - used[i] - _running_need(view, by_index[i]) for i in placement.devices)


def _running_need(view: ModelView, device: Device) -> float:
    """What ``view`` takes on one GPU once running: a whole-GPU model its engine's usual share (vLLM's)."""
    share = device.budget_gb * WHOLE_GPU_UTILIZATION if view.vram_gb is None else view.vram_gb
    return share + view.overhead_gb


def closing_for(
    target: str, views: Mapping[str, ModelView], budget_gb: Budget, arrival: float, batch_window: float
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


def _no_fit_message(target: str, views: Mapping[str, ModelView], budget_gb: Budget) -> str:
    view = views[target]
    devices = devices_of(budget_gb) or []
    pinned = [v.name for v in views.values() if v.pinned and v.name != target and v.claim_gb > 0]
    where = "the whole GPU" if view.want.count == 1 else f"{view.want.count} whole GPUs of one kind"
    wants = where if view.vram_gb is None else f"{view.vram_gb:g} GB of GPU memory" + (
        f" (+{view.overhead_gb:g} GB for its process)" if view.overhead_gb else "") + (
        f" on each of {view.want.count} GPUs of one kind" if view.want.count > 1 else "")
    if not devices:
        budget = ""
    elif len(devices) == 1 and view.want.allowed is None:
        budget = f" (budget {devices[0].budget_gb:g} GB)"
    else:
        budget = " (GPUs it may use: " + (", ".join(
            f"{d.index}: {d.budget_gb:g} GB" for d in devices
            if view.want.allowed is None or d.index in view.want.allowed) or "none") + ")"
    if not candidate_sets(view, devices) and devices:
        return f"model {target!r} needs {wants}, and no set of GPUs it may use has that many{budget}"
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

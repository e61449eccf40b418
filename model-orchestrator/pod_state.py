"""What a pod publishes for a gateway in front of several pods (``GET /fleet/state``). Pure; no I/O.

A gateway that sends each request to the pod where its model is warm (issue: one URL for several
pods, docs/DEPLOYMENT.md) polls this about once a second. It is small and stable, and versioned by
``schema``: a field is only ever added. Per model it says what a router ranks by: ready, starting,
parked or stopped; requests in flight and waiting; whether it would fit without evicting anything;
and how long its last start took. ``boot_id`` changes with every start of the orchestrator, so a
gateway can forget what it knew of a pod that restarted.

Scope: admin (model_orchestrator/auth.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.supervision.service_state import ServiceState
from model_orchestrator.model_view import ModelView
from model_orchestrator.placement import used_gb
from model_orchestrator.scheduler import Budget, devices_of, placement_for

SCHEMA = 1


def pod_state(pod: Mapping[str, Any], views: Mapping[str, ModelView], waiting: Mapping[str, int], budget: Budget,
              now: float, load_seconds: Mapping[str, float | None]) -> dict[str, Any]:
    """The published state: ``pod`` (pod_id, boot_id, config_hash, accepting, generated_at) with the budget
    and every model, from the coordinator's views of one instant."""
    return {"schema": SCHEMA, **pod, "budget": _budget(views, budget),
            "models": {name: _model(name, views, waiting.get(name, 0), budget, now, load_seconds.get(name))
                       for name in sorted(views)}}


def _budget(views: Mapping[str, ModelView], budget: Budget) -> dict[str, Any]:
    devices = devices_of(budget)
    if devices is None:
        return {"total_gb": None, "used_gb": None, "free_gb": None, "devices": []}
    used = used_gb(views, devices, skip=set())
    per_device = [{"index": d.index, "total_gb": round(d.budget_gb, 3), "used_gb": round(used[d.index], 3),
                   "free_gb": round(max(0.0, d.budget_gb - used[d.index]), 3)} for d in devices]
    total = sum(d["total_gb"] for d in per_device)
    taken = sum(d["used_gb"] for d in per_device)
    return {"total_gb": round(total, 3), "used_gb": round(taken, 3), "free_gb": round(max(0.0, total - taken), 3),
            "devices": per_device}


def _model(name: str, views: Mapping[str, ModelView], waiting: int, budget: Budget, now: float,
           load_seconds: float | None) -> dict[str, Any]:
    view = views[name]
    return {"state": view.state.value, "in_flight": view.in_flight, "waiting": waiting, "vram_gb": view.vram_gb,
            "fits_without_eviction": fits_without_eviction(name, views, budget),
            "idle_seconds": round(now - view.last_used, 1) if view.last_used and not view.in_flight else None,
            "load_seconds": None if load_seconds is None else round(load_seconds, 2)}


def fits_without_eviction(name: str, views: Mapping[str, ModelView], budget: Budget) -> bool:
    """Whether ``name`` serves (or could start) here without stopping or parking another model: true when it
    is already resident."""
    if views[name].state in (ServiceState.READY, ServiceState.STARTING, ServiceState.RESTORING):
        return True
    placement = placement_for(name, views, budget)
    return placement is not None and not placement.victims

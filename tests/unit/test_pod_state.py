"""What a pod publishes for a gateway (model_orchestrator/pod_state.py), over scheduler views built in memory."""

from __future__ import annotations

from typing import Any

from core.supervision.service_state import ServiceState as S
from model_orchestrator.model_view import ModelView
from model_orchestrator.placement import Device
from model_orchestrator.pod_state import SCHEMA, fits_without_eviction, pod_state

POD = {"pod_id": "pod-a", "boot_id": "b1", "config_hash": "abc", "accepting": True, "generated_at": 1.0}


def v(name: str, state: S = S.STOPPED, **kw: Any) -> ModelView:
    return ModelView(name=name, state=state, **kw)


VIEWS = {"qwen": v("qwen", S.READY, vram_gb=16, in_flight=2, last_used=90.0),
         "flux": v("flux", S.PARKED, vram_gb=24, parkable=True, last_used=50.0),
         "small": v("small", vram_gb=4), "big": v("big", vram_gb=40)}


def test_the_state_names_the_pod_its_budget_and_what_each_model_would_cost() -> None:
    state = pod_state(POD, VIEWS, {"big": 3}, 48.0, now=100.0, load_seconds={"qwen": 31.234})
    assert state["schema"] == SCHEMA and {k: state[k] for k in POD} == POD
    assert state["budget"] == {"total_gb": 48.0, "used_gb": 16.0, "free_gb": 32.0,
                               "devices": [{"index": 0, "total_gb": 48.0, "used_gb": 16.0, "free_gb": 32.0}]}
    models = state["models"]
    assert list(models) == ["big", "flux", "qwen", "small"]
    assert models["qwen"] == {"state": "ready", "in_flight": 2, "waiting": 0, "vram_gb": 16,
                              "fits_without_eviction": True, "idle_seconds": None, "load_seconds": 31.23}
    assert models["flux"]["idle_seconds"] == 50.0 and models["flux"]["state"] == "parked"
    assert models["small"]["fits_without_eviction"] and not models["big"]["fits_without_eviction"]
    assert models["big"]["waiting"] == 3 and models["big"]["load_seconds"] is None


def test_several_gpus_each_with_its_budget() -> None:
    devices = [Device(0, 24.0), Device(1, 24.0)]
    views = {"a": v("a", S.READY, vram_gb=20, devices=(1,)), "b": v("b", vram_gb=20)}
    budget = pod_state(POD, views, {}, devices, now=0.0, load_seconds={})["budget"]
    assert budget["devices"] == [{"index": 0, "total_gb": 24.0, "used_gb": 0.0, "free_gb": 24.0},
                                 {"index": 1, "total_gb": 24.0, "used_gb": 20.0, "free_gb": 4.0}]
    assert budget["free_gb"] == 28.0 and fits_without_eviction("b", views, devices)  # on GPU 0


def test_without_a_budget_nothing_is_accounted() -> None:
    state = pod_state(POD, {"a": v("a")}, {}, None, now=0.0, load_seconds={})
    assert state["budget"]["total_gb"] is None and state["models"]["a"]["fits_without_eviction"]

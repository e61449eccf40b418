"""Which pod a gateway sends each request to (model_orchestrator/gateway/policy.py), over published states."""

from __future__ import annotations

from typing import Any

from model_orchestrator.gateway.policy import (
    MISSES,
    START_MEMORY_S,
    Pods,
    Starts,
    choose,
    failed_pods,
    served_name,
)
from model_orchestrator.gateway.policy import pod_of as deployment_pod

DEPLOYMENTS = [{"pod": "p1"}, {"pod": "p2"}, {"pod": "p3"}]


def pod_of(deployment: dict[str, str]) -> str:
    return deployment["pod"]


def state(boot: str = "b", free: float = 10.0, **models: dict[str, Any]) -> dict[str, Any]:
    return {"boot_id": boot, "accepting": True, "budget": {"free_gb": free}, "models": models}


def stopped(fits: bool = True) -> dict[str, Any]:
    return {"state": "stopped", "in_flight": 0, "waiting": 0, "fits_without_eviction": fits}


def pods(**states: dict[str, Any]) -> Pods:
    found = Pods()
    for pod, published in states.items():
        found.observed(pod, published)
    return found


def picks(chosen: list[dict[str, str]]) -> list[str]:
    return [pod_of(d) for d in chosen]


def test_a_warm_model_goes_to_its_pod_and_the_least_busy_of_several() -> None:
    fleet = pods(p1=state(m=stopped()), p2=state(m={"state": "ready", "in_flight": 3, "waiting": 0}),
                 p3=state(m={"state": "ready", "in_flight": 1, "waiting": 1}))
    assert picks(choose("m", DEPLOYMENTS, pod_of, fleet, Starts())) == ["p3"]  # 2 in flight and waiting, not 3
    fleet.observed("p3", state(m={"state": "ready", "in_flight": 3, "waiting": 0}))
    assert picks(choose("m", DEPLOYMENTS, pod_of, fleet, Starts())) == ["p2", "p3"]  # a tie: the engine picks


def test_a_burst_for_a_cold_model_starts_it_on_one_pod_only() -> None:
    fleet, starts = pods(p1=state(free=5, m=stopped()), p2=state(free=20, m=stopped()), p3=state(m=stopped())), Starts()
    chosen = [picks(choose("m", DEPLOYMENTS, pod_of, fleet, starts, now=1.0 + i / 10)) for i in range(5)]
    assert chosen == [["p2"]] * 5  # the most free budget, then "starting there" for the rest of the burst
    assert picks(choose("m", DEPLOYMENTS, pod_of, fleet, starts, now=1.0 + START_MEMORY_S + 1)) == ["p2"]  # re-chosen


def test_parked_beats_stopped_and_fitting_beats_evicting() -> None:
    fleet = pods(p1=state(m=stopped()), p2=state(m={"state": "parked"}), p3=state(free=40, m=stopped(fits=False)))
    assert picks(choose("m", DEPLOYMENTS, pod_of, fleet, Starts())) == ["p2"]
    fleet.observed("p2", state(m=stopped(fits=False), free=50))
    assert picks(choose("m", DEPLOYMENTS, pod_of, fleet, Starts())) == ["p1"]  # fits, though p2 has more free


def test_a_silent_pod_is_dropped_after_two_misses_and_a_restarted_one_is_routed_again() -> None:
    fleet, starts = pods(p1=state(m=stopped()), p2=state(free=20, m=stopped())), Starts()
    assert picks(choose("m", DEPLOYMENTS[:2], pod_of, fleet, starts, now=0.0)) == ["p2"]  # starting there now
    fleet.observed("p2", None, starts)
    assert fleet.fresh("p2") is not None  # one miss is not enough
    fleet.observed("p2", None, starts)  # killed while loading: dropped, and its start with it
    assert MISSES == 2 and fleet.fresh("p2") is None and not starts.under_way("p2", "m", 1.0)
    assert picks(choose("m", DEPLOYMENTS[:2], pod_of, fleet, starts, now=1.0)) == ["p1"]
    fleet.observed("p2", state(boot="b2", free=20, m=stopped()), starts)  # back, a new boot
    assert fleet.fresh("p2") is not None and not starts.under_way("p2", "m", 2.0)
    assert picks(choose("m", DEPLOYMENTS[:2], pod_of, fleet, starts, now=2.0)) == ["p1"]  # p1 is starting it


def test_the_pods_a_request_failed_on_are_skipped_and_the_answer_is_never_empty() -> None:
    fleet = pods(p1=state(m={"state": "ready"}), p2=state(m=stopped()))
    assert picks(choose("m", DEPLOYMENTS[:2], pod_of, fleet, Starts(), failed_pods={"p1"})) == ["p2"]
    everything = picks(choose("m", DEPLOYMENTS[:2], pod_of, fleet, Starts(), failed_pods={"p1", "p2"}))
    assert everything == ["p1"]  # all failed: judged again among all
    assert picks(choose("m", DEPLOYMENTS, pod_of, Pods(), Starts())) == ["p1", "p2", "p3"]  # no state at all
    fleet.observed("p1", {**state(m={"state": "ready"}), "accepting": False})  # shutting down
    assert picks(choose("m", DEPLOYMENTS[:2], pod_of, fleet, Starts())) == ["p2"]


def deployment(pod: str, name: str, model: str | None = None) -> dict[str, Any]:
    return {"model_name": name, "model_info": {"id": f"{pod}/{name}", "pod": pod, "aio_model": model or name}}


def test_the_pods_a_request_failed_on_come_from_litellms_retry_records() -> None:
    deployments = [deployment("a", "m"), deployment("b", "m"), deployment("c", "m")]
    kwargs = {"metadata": {"previous_models": [{"deployment_id": "b/m", "exception_type": "APIConnectionError"}]}}
    assert failed_pods(kwargs, deployments) == {"b"}
    assert failed_pods({"litellm_metadata": {"previous_models": [{"deployment_id": "a/m"}]}}, deployments) == {"a"}
    assert failed_pods(None, deployments) == set() and failed_pods({"metadata": None}, deployments) == set()


def test_an_alias_is_ranked_by_the_name_the_pods_publish() -> None:
    assert served_name("qwen", [deployment("a", "qwen", "qwen2.5-7b-instruct")]) == "qwen2.5-7b-instruct"
    assert served_name("m", [{"model_info": {}}]) == "m" and deployment_pod(deployment("a", "m")) == "a"

"""Warm swap decisions: plan()'s Restore and park-or-stop choices, and idle_action(), over snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from core.supervision.service_state import ServiceState
from model_orchestrator.model_view import why_not_parkable
from model_orchestrator.scheduler import (
    IdleDecision,
    Join,
    ModelView,
    Restore,
    Start,
    Wait,
    idle_action,
    park_or_stop,
    park_room,
    plan,
)
from tests.unit.test_scheduler import NOW, WINDOW, snap, v

S = ServiceState


def decide(target: str, views: dict[str, ModelView], host: float | None, budget: float | None = 40.0) -> Any:
    return plan(target, views, budget, NOW, WINDOW, host_budget_gb=host)


# --- the target's own state ---------------------------------------------------------------------


def test_parked_target_is_restored_not_started() -> None:
    views = snap(v("m", S.PARKED, vram_gb=20, parkable=True, host_gb=20), v("o", S.READY, vram_gb=10))
    assert decide("m", views, host=100) == Restore((), ())


def test_restoring_target_is_joined() -> None:
    assert decide("m", snap(v("m", S.RESTORING, vram_gb=20)), host=100) == Join()


def test_parking_target_waits_for_the_park_to_end() -> None:
    decision = decide("m", snap(v("m", S.PARKING, vram_gb=20)), host=100)
    assert isinstance(decision, Wait)
    assert "m is parking" in decision.reason


def test_parked_model_holds_no_gpu_memory() -> None:
    views = snap(v("m", vram_gb=30), v("p", S.PARKED, vram_gb=30, parkable=True, host_gb=30))
    assert decide("m", views, host=100) == Start((), ())


# --- park or stop the victims -----------------------------------------------------------------------


def swap(host: float | None, **victim: Any) -> Any:
    views = snap(v("m", vram_gb=30), v("o", S.READY, vram_gb=30, last_used=5.0, **victim))
    return decide("m", views, host)


def test_a_parkable_victim_that_fits_the_host_budget_is_parked() -> None:
    assert swap(100, parkable=True, park_host_gb=30) == Start(("o",), ("o",))


def test_a_victim_that_cannot_park_is_stopped() -> None:
    assert swap(100, parkable=False, park_host_gb=30) == Start(("o",), ())


def test_a_victim_too_big_for_the_host_budget_is_stopped() -> None:
    assert swap(20, parkable=True, park_host_gb=30) == Start(("o",), ())


def test_host_budget_zero_never_parks_and_none_is_unlimited() -> None:
    assert swap(0, parkable=True, park_host_gb=1) == Start(("o",), ())
    assert swap(None, parkable=True, park_host_gb=1e6) == Start(("o",), ("o",))


def test_a_kept_host_copy_costs_nothing_more_to_park() -> None:
    # o was parked before and kept its host copy (20 GB of the 25 GB budget): parking again adds 0
    assert swap(25, parkable=True, park_host_gb=20, host_gb=20) == Start(("o",), ("o",))


def test_a_park_of_unknown_size_fits_only_alone() -> None:
    assert swap(100, parkable=True, park_host_gb=None) == Start(("o",), ("o",))
    views = snap(v("m", vram_gb=30), v("o", S.READY, vram_gb=30, parkable=True, park_host_gb=None),
                 v("p", S.PARKED, vram_gb=30, host_gb=1, last_used=50.0))
    assert decide("m", views, host=100) == Start(("o",), ())


def test_older_parked_models_are_stopped_to_make_host_room() -> None:
    views = snap(v("m", vram_gb=30), v("o", S.READY, vram_gb=30, last_used=50.0, parkable=True, park_host_gb=30),
                 v("old", S.PARKED, vram_gb=30, host_gb=30, last_used=10.0),
                 v("older", S.PARKED, vram_gb=30, host_gb=30, last_used=1.0))
    # 60 held, 70 budget: the least recently used parked model goes so o can park
    assert decide("m", views, host=70) == Start(("o", "older"), ("o",))


def test_parked_models_used_more_recently_than_the_victim_stay() -> None:
    views = snap(v("m", vram_gb=30), v("o", S.READY, vram_gb=30, last_used=5.0, parkable=True, park_host_gb=30),
                 v("newer", S.PARKED, vram_gb=30, host_gb=30, last_used=50.0))
    assert decide("m", views, host=40) == Start(("o",), ())


def test_pinned_parked_models_are_never_stopped_for_room() -> None:
    views = snap(v("m", vram_gb=30), v("o", S.READY, vram_gb=30, last_used=50.0, parkable=True, park_host_gb=30),
                 v("p", S.PARKED, vram_gb=30, host_gb=30, last_used=1.0, pinned=True))
    assert decide("m", views, host=40) == Start(("o",), ())


def test_two_victims_share_the_host_budget_in_eviction_order() -> None:
    views = snap(v("m"), v("a", S.READY, vram_gb=10, last_used=1.0, parkable=True, park_host_gb=10),
                 v("b", S.READY, vram_gb=10, last_used=2.0, parkable=True, park_host_gb=10))
    assert decide("m", views, host=15) == Start(("a", "b"), ("a",))


def test_restoring_also_parks_its_victims() -> None:
    views = snap(v("m", S.PARKED, vram_gb=30, parkable=True, host_gb=30),
                 v("o", S.READY, vram_gb=30, parkable=True, park_host_gb=30))
    assert decide("m", views, host=100) == Restore(("o",), ("o",))


def test_the_model_being_restored_is_never_stopped_for_host_room() -> None:
    # m holds 30 of the 40 GB host budget parked and is older than o: stopping it would make room,
    # but m is what the swap is for, so o is stopped instead
    views = snap(v("m", S.PARKED, last_used=1.0, parkable=True, host_gb=30),
                 v("o", S.READY, last_used=5.0, parkable=True, park_host_gb=30))
    assert decide("m", views, host=40) == Restore(("o",), ())


def test_park_or_stop_adds_what_parking_holds() -> None:
    views = snap(v("a", S.READY, parkable=True, park_host_gb=6), v("b", S.READY, parkable=True, park_host_gb=6))
    assert park_or_stop(["a", "b"], views, 12) == (("a", "b"), ())
    assert park_or_stop(["a", "b"], views, 11.9) == (("a",), ())


# --- idle timers: park.idle parks, ttl stops ----------------------------------------------------------


def idle(view: ModelView, host: float | None = 100) -> tuple[Any, ...]:
    """(action, when to look again), for a model alone: nothing to stop for host room."""
    decision = idle_action(view.name, snap(view), NOW, host)
    assert decision.stops == ()
    return decision.action, decision.at


def test_idle_past_park_idle_parks() -> None:
    view = v("m", S.READY, last_used=NOW - 61, park_idle=60, ttl=600, parkable=True, park_host_gb=1)
    assert idle(view) == ("park", None)


def test_idle_before_park_idle_says_when_to_look_again() -> None:
    view = v("m", S.READY, last_used=NOW - 10, park_idle=60, ttl=600, parkable=True, park_host_gb=1)
    assert idle(view) == (None, NOW + 50)


def test_parked_model_stops_at_ttl() -> None:
    assert idle(v("m", S.PARKED, last_used=NOW - 601, park_idle=60, ttl=600)) == ("stop", None)
    assert idle(v("m", S.PARKED, last_used=NOW - 100, park_idle=60, ttl=600)) == (None, NOW + 500)


def test_park_that_does_not_fit_waits_for_ttl_to_stop() -> None:
    view = v("m", S.READY, last_used=NOW - 61, park_idle=60, ttl=600, parkable=True, park_host_gb=10)
    assert idle(view, host=5) == (None, NOW + 539)


def test_ttl_only_stops_as_before() -> None:
    assert idle(v("m", S.READY, last_used=NOW - 11, ttl=10)) == ("stop", None)
    assert idle(v("m", S.READY, last_used=NOW - 5, ttl=10)) == (None, NOW + 5)


@pytest.mark.parametrize("busy", [{"in_flight": 1}, {"oldest_waiter": NOW - 1}])
def test_busy_or_awaited_models_are_left_alone(busy: dict[str, Any]) -> None:
    view = v("m", S.READY, last_used=NOW - 700, park_idle=60, ttl=600, parkable=True, park_host_gb=1, **busy)
    assert idle(view) == (None, None)


def test_no_timers_never_wake() -> None:
    assert idle(v("m", S.READY, last_used=NOW - 1e6)) == (None, None)


# --- one rule for every park: park_room (#19: the idle timer and the admin route ignored the budget) ----


def test_idle_park_stops_older_parked_models_to_fit_the_host_budget() -> None:
    # Budget 15 GB, a parked at 10 GB, c idle at 10 GB: parking c as well would pin 20 GB. The idle
    # timer must stop a first (used less recently than c), as an eviction would.
    views = snap(v("a", S.PARKED, last_used=NOW - 500, parkable=True, host_gb=10, park_host_gb=10),
                 v("c", S.READY, last_used=NOW - 61, park_idle=60, parkable=True, park_host_gb=10))
    assert idle_action("c", views, NOW, 15) == IdleDecision("park", None, ("a",))
    assert park_room("c", views, 15) == ("a",)


def test_idle_park_that_cannot_make_room_does_not_park() -> None:
    # a was used more recently than c: it is not stopped for c, so c cannot park within 15 GB
    views = snap(v("a", S.PARKED, last_used=NOW - 10, parkable=True, host_gb=10, park_host_gb=10),
                 v("c", S.READY, last_used=NOW - 61, park_idle=60, parkable=True, park_host_gb=10))
    assert idle_action("c", views, NOW, 15) == IdleDecision(None, None)
    assert park_room("c", views, 15) is None


@pytest.mark.parametrize("budget", [0.0, 5.0])
def test_park_room_refuses_when_parking_is_off_or_too_big(budget: float) -> None:
    views = snap(v("c", S.READY, parkable=True, park_host_gb=10))
    assert park_room("c", views, budget) is None
    assert park_room("c", views, 10.0) == ()
    assert park_room("c", views, None) == ()  # no budget: anything fits


def test_park_room_needs_a_parkable_model() -> None:
    assert park_room("c", snap(v("c", S.READY, parkable=False, park_host_gb=1)), 100) is None


# --- what a process and a parked model keep on the GPU (#20) ---------------------------------------------
# Each model process holds a CUDA context beside its share (overhead_gb), parked too, and a parked vLLM
# keeps its CUDA graphs (kept_gb). vLLM refuses to start when the free memory is below its share, so
# the budget must count them.

OV = 0.5


def test_a_start_needs_its_share_and_its_process_overhead() -> None:
    views = snap(v("a", S.READY, vram_gb=20, overhead_gb=OV, last_used=1.0),
                 v("b", S.STOPPED, vram_gb=19.5, overhead_gb=OV))
    assert decide("b", views, host=0) == Start(("a",), ())  # 20.5 + 20 > 40
    views = snap(v("a", S.READY, vram_gb=20, overhead_gb=OV), v("b", S.STOPPED, vram_gb=19, overhead_gb=OV))
    assert decide("b", views, host=0) == Start()  # 20.5 + 19.5 = 40: fits


def test_a_parked_model_keeps_its_context_and_graphs_on_the_gpu() -> None:
    # q parked keeps 0.5 + 1.5; f (36 + 0.5) fits 40 beside that, but not beside m as well
    q = v("q", S.PARKED, vram_gb=22, overhead_gb=OV, kept_gb=1.5, parkable=True, last_used=1.0)
    m = v("m", S.READY, vram_gb=1.5, overhead_gb=OV, last_used=5.0)
    f = v("f", S.STOPPED, vram_gb=36, overhead_gb=OV)
    assert decide("f", snap(q, f), host=100) == Start()
    assert decide("f", snap(q, m, f), host=100) == Start(("m",), ())  # idle m goes before stopping parked q


def test_a_parked_model_is_stopped_when_nothing_else_makes_room() -> None:
    q = v("q", S.PARKED, vram_gb=22, overhead_gb=OV, kept_gb=2, parkable=True, last_used=1.0)
    f = v("f", S.STOPPED, vram_gb=38, overhead_gb=OV)
    assert decide("f", snap(q, f), host=100) == Start(("q",), ())  # q is stopped, never "parked" again


def test_a_victim_parks_only_if_what_it_keeps_fits_beside_the_model_it_makes_room_for() -> None:
    # Parked, a keeps 0.5 + 1 = 1.5 GB: beside b (39 + 0.5) that is over 40, so a is stopped instead;
    # beside c (38 + 0.5) it fits, so a is parked.
    a = v("a", S.READY, vram_gb=20, overhead_gb=OV, kept_gb=1, parkable=True, park_host_gb=10, last_used=1.0)
    b = v("b", S.STOPPED, vram_gb=39, overhead_gb=OV)
    assert decide("b", snap(a, b), host=100) == Start(("a",), ())
    c = v("c", S.STOPPED, vram_gb=38, overhead_gb=OV)
    assert decide("c", snap(a, c), host=100) == Start(("a",), ("a",))


def test_a_model_that_needs_the_whole_gpu_leaves_room_for_parks_only_in_its_tenth() -> None:
    a = v("a", S.READY, vram_gb=20, overhead_gb=OV, kept_gb=1, parkable=True, park_host_gb=10, last_used=1.0)
    whole = v("w", S.STOPPED, overhead_gb=OV)  # vLLM's default: 0.9 of the card
    assert decide("w", snap(a, whole), host=100) == Start(("a",), ("a",))  # 36 + 0.5 + 1.5 <= 40
    big = v("a", S.READY, vram_gb=20, overhead_gb=OV, kept_gb=4, parkable=True, park_host_gb=10, last_used=1.0)
    assert decide("w", snap(big, whole), host=100) == Start(("a",), ())


def test_the_claim_of_each_state() -> None:
    assert v("a", S.READY, vram_gb=10, overhead_gb=OV).claim_gb == 10.5
    assert v("a", S.STARTING, vram_gb=10, overhead_gb=OV).claim_gb == 10.5
    assert v("a", S.PARKED, vram_gb=10, overhead_gb=OV, kept_gb=2).claim_gb == 2.5
    assert v("a", S.STOPPED, vram_gb=10, overhead_gb=OV).claim_gb == 0
    assert v("a", S.READY, overhead_gb=OV).claim_gb == float("inf")  # no vram_gb: the whole GPU


@pytest.mark.parametrize(("view", "budget", "why"), [
    (v("m", ServiceState.READY), 8.0, "vLLM on CPU cannot park"),
    (v("m", ServiceState.STARTING, parkable=True), 8.0, "it is starting"),
    (v("m", ServiceState.READY, parkable=True, in_flight=1), 8.0, "requests are using or awaiting it"),
    (v("m", ServiceState.READY, parkable=True, oldest_waiter=NOW), 8.0, "requests are using or awaiting it"),
    (v("m", ServiceState.READY, parkable=True), 0.0, "parking is off (settings.host_memory_gb: 0)"),
    (v("m", ServiceState.READY, parkable=True, park_host_gb=12.0), 8.0,
     "parked it would hold 12 GB of host memory, more than the host budget (8 GB, settings.host_memory_gb) has "
     "room for"),
    (v("m", ServiceState.READY, parkable=True), 8.0, "parked it would hold an unknown amount of host memory"),
])
def test_an_operator_is_told_why_a_model_cannot_park(view: ModelView, budget: float, why: str) -> None:
    assert why_not_parkable(view, "vLLM on CPU cannot park", budget).startswith(why)

"""plan(), can_serve_now(), memory_victims() and closing_for() over ModelView snapshots (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from core.supervision.service_state import ServiceState
from model_orchestrator.refusals import Reason, Refused, http_error
from model_orchestrator.scheduler import (
    Join,
    ModelView,
    Reject,
    Serve,
    Start,
    Wait,
    can_serve_now,
    closing_for,
    memory_victims,
    plan,
)

S = ServiceState
NOW = 1000.0
WINDOW = 5.0


def v(name: str, state: ServiceState = S.STOPPED, **kw: Any) -> ModelView:
    return ModelView(name=name, state=state, **kw)


def snap(*views: ModelView) -> dict[str, ModelView]:
    return {view.name: view for view in views}


def decide(target: str, views: dict[str, ModelView], budget: float | None = 40.0, now: float = NOW) -> Any:
    return plan(target, views, budget, now, WINDOW)


# --- the target's own state ---------------------------------------------------------------


def test_ready_serves() -> None:
    assert decide("m", snap(v("m", S.READY, vram_gb=10))) == Serve()


def test_starting_joins() -> None:
    assert decide("m", snap(v("m", S.STARTING, vram_gb=10))) == Join()


def test_stopping_waits() -> None:
    decision = decide("m", snap(v("m", S.STOPPING, vram_gb=10)))
    assert isinstance(decision, Wait)
    assert "m is stopping" in decision.reason


def test_stopped_that_fits_starts_without_evicting() -> None:
    views = snap(v("m", vram_gb=20), v("o", S.READY, vram_gb=20))
    assert decide("m", views) == Start(())


def test_ready_at_max_concurrency_waits() -> None:
    assert decide("m", snap(v("m", S.READY, in_flight=1, max_concurrency=2))) == Serve()
    decision = decide("m", snap(v("m", S.READY, in_flight=2, max_concurrency=2)))
    assert isinstance(decision, Wait)
    assert "max_concurrency (2)" in decision.reason


def test_failed_in_cooldown_is_rejected_with_retry_after() -> None:
    decision = decide("m", snap(v("m", S.FAILED, vram_gb=10, failed_until=NOW + 30)))
    assert decision == Reject(Reason.COOLING_DOWN, "model 'm' failed repeatedly and is cooling down", retry_after=30)
    assert "'m'" in decision.message


# --- can_serve_now: the Serve rule the coordinator's fast path shares with plan() ---------


@pytest.mark.parametrize(
    ("view", "servable"),
    [
        (v("m", S.READY, in_flight=0, max_concurrency=1), True),
        (v("m", S.READY, in_flight=31, max_concurrency=32), True),
        (v("m", S.READY, in_flight=32, max_concurrency=32), False),
        (v("m", S.READY, in_flight=500, max_concurrency=None), True),
        (v("m", S.STARTING, max_concurrency=32), False),
        (v("m", S.STOPPING, max_concurrency=32), False),
        (v("m", S.STOPPED, max_concurrency=32), False),
        (v("m", S.FAILED, max_concurrency=32), False),
    ],
    ids=["ready-idle", "one-slot-left", "full", "unbounded", "starting", "stopping", "stopped", "failed"],
)
def test_can_serve_now(view: ModelView, servable: bool) -> None:
    assert can_serve_now(view) is servable


GRID = [
    v("m", state, vram_gb=vram, in_flight=in_flight, max_concurrency=2, failed_until=NOW + 10)
    for state in S for vram in (10.0, 35.0, None) for in_flight in (0, 1, 2)
]


@pytest.mark.parametrize("target", GRID, ids=lambda view: f"{view.state.value}-{view.vram_gb}-{view.in_flight}")
def test_with_no_waiters_can_serve_now_is_exactly_plan_serving(target: ModelView) -> None:
    # Whatever the others hold, plan() serves a request nobody queued behind exactly when
    # can_serve_now() says so: the coordinator's fast path may skip plan() only because of this.
    others = [v("busy", S.READY, vram_gb=20, in_flight=1), v("idle", S.READY, vram_gb=10)]
    for views in (snap(target), snap(target, *others), snap(target, others[0])):
        assert (decide("m", views) == Serve()) is can_serve_now(target)


def test_a_waiter_elsewhere_can_close_a_model_that_can_serve_now() -> None:
    # Why the fast path needs "nobody waiting anywhere" besides can_serve_now().
    views = _batch(waited=WINDOW + 1)
    assert can_serve_now(views["a"])
    assert isinstance(decide("a", views), Wait)


def test_failed_after_cooldown_starts_again() -> None:
    views = snap(v("m", S.FAILED, vram_gb=10, failed_until=NOW), v("o", S.READY, vram_gb=35))
    assert decide("m", views) == Start(("o",))


# --- eviction ---------------------------------------------------------------------------


def test_evicts_least_recently_used_idle_just_enough() -> None:
    views = snap(
        v("m", vram_gb=15),
        v("new", S.READY, vram_gb=10, last_used=9),
        v("old", S.READY, vram_gb=10, last_used=1),
        v("mid", S.READY, vram_gb=10, last_used=5),
    )
    assert decide("m", views) == Start(("old",))  # 40 - 30 = 10 free, one more 10 GB model is enough
    bigger = {**views, "m": v("m", vram_gb=25)}
    assert decide("m", bigger) == Start(("old", "mid"))
    assert memory_victims("m", bigger, 40.0) == ["old", "mid"]


def test_idle_preferred_over_busy_even_if_busy_is_older() -> None:
    views = snap(
        v("m", vram_gb=20),
        v("busy", S.READY, vram_gb=20, in_flight=1, last_used=1),
        v("idle", S.READY, vram_gb=20, last_used=9),
    )
    assert memory_victims("m", views, 40.0) == ["idle"]
    assert decide("m", views) == Start(("idle",))


def test_busy_victim_means_wait() -> None:
    views = snap(v("m", vram_gb=30), v("busy", S.READY, vram_gb=20, in_flight=1), v("idle", S.READY, vram_gb=10))
    assert memory_victims("m", views, 40.0) == ["idle", "busy"]
    decision = decide("m", views)
    assert isinstance(decision, Wait)
    assert "busy" in decision.reason
    assert "idle" not in decision.reason


def test_starting_victim_means_wait() -> None:
    views = snap(v("m", vram_gb=30), v("s", S.STARTING, vram_gb=20))
    decision = decide("m", views)
    assert isinstance(decision, Wait)
    assert "s" in decision.reason


def test_pinned_is_never_evicted() -> None:
    views = snap(
        v("m", vram_gb=20),
        v("pin", S.READY, vram_gb=20, pinned=True, last_used=0),
        v("other", S.READY, vram_gb=20, last_used=5),
    )
    assert decide("m", views) == Start(("other",))


def test_only_pinned_could_free_memory_rejects() -> None:
    views = snap(v("m", vram_gb=20), v("pin", S.READY, vram_gb=30, pinned=True), v("x", S.READY, vram_gb=5))
    assert memory_victims("m", views, 40.0) is None
    decision = decide("m", views)
    assert isinstance(decision, Reject)
    assert (decision.reason, decision.retry_after) == (Reason.NO_FIT, None)
    assert "'m'" in decision.message
    assert "pin" in decision.message
    assert "budget 40 GB" in decision.message



def test_too_big_for_budget_message_does_not_blame_pinned_models() -> None:
    decision = decide("m", snap(v("m", vram_gb=50), v("x", S.READY, vram_gb=5)))
    assert isinstance(decision, Reject)
    assert decision.reason is Reason.NO_FIT
    assert "pinned" not in decision.message


def test_stopped_and_failed_models_hold_no_memory() -> None:
    views = snap(v("m", vram_gb=40), v("off", vram_gb=40), v("dead", S.FAILED, vram_gb=40, failed_until=NOW + 9))
    assert decide("m", views) == Start(())


def test_stopping_models_are_evicted_first() -> None:
    views = snap(
        v("m", vram_gb=20),
        v("leaving", S.STOPPING, vram_gb=20, last_used=9),
        v("idle", S.READY, vram_gb=20, last_used=1),
    )
    assert memory_victims("m", views, 40.0) == ["leaving"]  # counted as freeing its memory
    decision = decide("m", views)
    assert isinstance(decision, Wait)  # its memory is not free until it has stopped
    assert "leaving" in decision.reason
    assert memory_victims("m", {**views, "m": v("m", vram_gb=40)}, 40.0) == ["leaving", "idle"]


# --- whole-GPU models and an unknown budget -------------------------------------------


def test_whole_gpu_model_evicts_all_others_in_order() -> None:
    views = snap(
        v("m"),
        v("busy", S.READY, vram_gb=1, in_flight=1, last_used=0),
        v("idle_new", S.READY, vram_gb=1, last_used=8),
        v("idle_old", S.READY, vram_gb=1, last_used=2),
        v("leaving", S.STOPPING, vram_gb=1, last_used=9),
        v("off", vram_gb=1),
    )
    assert memory_victims("m", views, 40.0) == ["leaving", "idle_old", "idle_new", "busy"]
    idle_only = snap(v("m"), v("a", S.READY, vram_gb=1, last_used=3), v("b", S.READY, last_used=1))
    assert decide("m", idle_only) == Start(("b", "a"))
    assert decide("m", idle_only, budget=None) == Start(("b", "a"))


def test_whole_gpu_model_blocked_by_pinned() -> None:
    views = snap(v("m"), v("pin", S.READY, vram_gb=1, pinned=True))
    decision = decide("m", views, budget=None)
    assert isinstance(decision, Reject)
    assert decision.reason is Reason.NO_FIT
    assert "the whole GPU" in decision.message


def test_whole_gpu_other_blocks_model_with_vram() -> None:
    views = snap(v("m", vram_gb=1), v("whole", S.READY, last_used=3))
    assert decide("m", views) == Start(("whole",))  # an unsized model counts as using everything


def test_unknown_budget_lets_sized_models_coexist() -> None:
    views = snap(v("m", vram_gb=500), v("a", S.READY, vram_gb=500), v("b", S.READY, vram_gb=500, in_flight=3))
    assert memory_victims("m", views, None) == []
    assert decide("m", views, budget=None) == Start(())


def test_unknown_budget_whole_gpu_model_conflicts() -> None:
    views = snap(v("m", vram_gb=5), v("sized", S.READY, vram_gb=5), v("whole", S.READY))
    assert memory_victims("m", views, None) == ["whole"]
    assert decide("m", views, budget=None) == Start(("whole",))
    pinned = {**views, "whole": v("whole", S.READY, pinned=True)}
    assert memory_victims("m", pinned, None) is None


# --- batch window -------------------------------------------------------------------------


def _batch(waited: float, need: float = 30.0) -> dict[str, ModelView]:
    """'a' is ready and busy; 'b' is stopped with a request that has waited ``waited`` seconds."""
    return snap(
        v("a", S.READY, vram_gb=30, in_flight=1, last_used=NOW - 1),
        v("b", vram_gb=need, oldest_waiter=NOW - waited),
    )


def test_busy_model_keeps_serving_within_batch_window() -> None:
    views = _batch(waited=WINDOW - 1)
    assert closing_for("a", views, 40.0, NOW, WINDOW) is None
    assert decide("a", views) == Serve()
    assert isinstance(decide("b", views), Wait)  # b waits for a to drain


@pytest.mark.parametrize("waited", [WINDOW, WINDOW + 10])
def test_busy_model_closes_once_waiter_is_older_than_window(waited: float) -> None:
    views = _batch(waited=waited)
    assert closing_for("a", views, 40.0, NOW, WINDOW) == "b"
    decision = decide("a", views)
    assert isinstance(decision, Wait)
    assert "draining so b can load" in decision.reason


def test_closing_model_is_evicted_once_drained() -> None:
    views = {**_batch(waited=WINDOW + 1), "a": v("a", S.READY, vram_gb=30, last_used=NOW)}
    assert decide("b", views) == Start(("a",))


def test_waiter_that_fits_without_eviction_does_not_close() -> None:
    views = _batch(waited=WINDOW + 100, need=10.0)
    assert closing_for("a", views, 40.0, NOW, WINDOW) is None
    assert decide("a", views) == Serve()
    assert decide("b", views) == Start(())


def test_waiter_that_evicts_someone_else_does_not_close() -> None:
    views = {
        **_batch(waited=WINDOW + 100, need=10.0),
        "c": v("c", S.READY, vram_gb=10, last_used=0),
    }
    assert memory_victims("b", views, 40.0) == ["c"]
    assert closing_for("a", views, 40.0, NOW, WINDOW) is None
    assert decide("a", views) == Serve()


def test_waiter_blocked_by_pinned_does_not_close() -> None:
    views = {**_batch(waited=WINDOW + 100, need=35.0), "p": v("p", S.READY, vram_gb=10, pinned=True)}
    assert memory_victims("b", views, 40.0) is None  # 40 - 10 pinned < 35 even with a gone
    assert closing_for("a", views, 40.0, NOW, WINDOW) is None
    assert decide("a", views) == Serve()


@pytest.mark.parametrize("state", [S.READY, S.STARTING])
def test_waiter_of_loaded_or_loading_model_does_not_close(state: ServiceState) -> None:
    views = {**_batch(waited=WINDOW + 100), "b": v("b", state, vram_gb=30, oldest_waiter=NOW - 100)}
    assert closing_for("a", views, 40.0, NOW, WINDOW) is None


def test_zero_batch_window_closes_at_once() -> None:
    views = _batch(waited=0.0)
    assert closing_for("a", views, 40.0, NOW, 0.0) == "b"
    assert isinstance(plan("a", views, 40.0, NOW, 0.0), Wait)


# --- regression: the swap livelock found by test_two_clients_alternating_two_models ------
# b became ready for its waiter, but a's older waiter evicted b before that waiter was
# served, then b's waiter evicted a the same way: every start was undone, nothing served.


def test_ready_model_is_not_evicted_before_its_current_batch_is_served() -> None:
    views = snap(
        v("a", vram_gb=30, oldest_waiter=NOW - 3),  # batch deadline NOW + 2
        v("b", S.READY, vram_gb=30, oldest_waiter=NOW - 1),  # arrived before it: b's batch
    )
    assert isinstance(decide("a", views), Wait)
    assert plan("b", views, 40.0, NOW, WINDOW, arrival=NOW - 1) == Serve()


def test_waiters_arriving_after_the_deadline_do_not_hold_off_eviction() -> None:
    views = snap(
        v("a", vram_gb=30, oldest_waiter=NOW - 10),  # batch deadline NOW - 5
        v("b", S.READY, vram_gb=30, oldest_waiter=NOW - 1),
    )
    assert decide("a", views) == Start(("b",))
    assert isinstance(plan("b", views, 40.0, NOW, WINDOW, arrival=NOW - 1), Wait)


def test_model_needing_no_gpu_memory_runs_beside_a_full_gpu() -> None:
    views = snap(v("big", S.READY, vram_gb=40), v("cpu", vram_gb=0))
    assert decide("cpu", views) == Start(())


# --- refusals: each reason's status, code and Retry-After, as the client sees them ----------


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.QUEUE_FULL, "queue_full"),
        (Reason.WAIT_TIMEOUT, "wait_timeout"),
        (Reason.START_FAILED, "model_start_failed"),
        (Reason.COOLING_DOWN, "model_failed"),
        (Reason.NO_FIT, "insufficient_gpu_memory"),
    ],
)
def test_every_refusal_is_a_503_with_its_code(reason: Reason, code: str) -> None:
    error = http_error(Refused(reason, "not now", retry_after=4.4))
    assert (error.status, error.code, error.message) == (503, code, "not now")
    assert error.body() == {"error": {"message": "not now", "type": "server_error", "code": code, "param": None}}
    assert error.headers() == {"retry-after": "4"}


def test_an_operator_park_that_does_not_apply_is_a_409() -> None:
    error = http_error(Refused(Reason.NOT_PARKABLE, "Model 'm' cannot be parked now: it is starting."))
    assert (error.status, error.code) == (409, "cannot_park")
    assert error.body()["error"]["type"] == "conflict_error" and error.headers() == {}


def test_a_refusal_without_retry_after_sends_no_header() -> None:
    error = http_error(Refused(Reason.NO_FIT, "model 'm' needs the whole GPU"))
    assert error.retry_after is None and error.headers() == {}


def test_a_rejection_of_plan_maps_to_the_envelope_clients_always_got() -> None:
    decision = decide("m", snap(v("m", S.FAILED, vram_gb=10, failed_until=NOW + 30)))
    assert isinstance(decision, Reject)
    error = http_error(Refused(decision.reason, decision.message, decision.retry_after))
    assert (error.status, error.code, error.headers()) == (503, "model_failed", {"retry-after": "30"})

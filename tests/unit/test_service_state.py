"""The service lifecycle: which state changes are legal, written out by hand from the design.

Each expectation below is stated here, not read from ``ALLOWED_TRANSITIONS``: the test
fails if the table gains or loses an edge, whichever way.
"""

from __future__ import annotations

import itertools

import pytest

from core.service_state import IllegalTransition, ServiceState, check_transition

S = ServiceState

# Every legal edge, with what takes it (docs/architecture.md, "One state machine per service").
LEGAL = {
    (S.STOPPED, S.STARTING): "a request or preload starts it",
    (S.STOPPED, S.FAILED): "a failure recorded after its process was cleaned up",
    (S.STARTING, S.READY): "the health check passed",
    (S.STARTING, S.STOPPING): "an unload, eviction or shutdown aborts the start",
    (S.STARTING, S.STOPPED): "the start failed; a retry after the backoff",
    (S.STARTING, S.FAILED): "the start failed once too often",
    (S.READY, S.STOPPING): "unload, eviction, TTL, shutdown, or a hang",
    (S.READY, S.STOPPED): "it crashed; the next request restarts it",
    (S.READY, S.FAILED): "it crashed once too often",
    (S.STOPPING, S.STOPPED): "the process tree is gone",
    (S.STOPPING, S.FAILED): "a hung service was killed, once too often",
    (S.FAILED, S.STOPPED): "an operator reset",
    (S.FAILED, S.STARTING): "the cooldown is over and a request came",
}

# Every edge that must be refused, with why: each would be a bug in the caller.
ILLEGAL = {
    (S.STOPPED, S.READY): "ready without ever starting",
    (S.STOPPED, S.STOPPING): "nothing to stop (stop() on a stopped service is a no-op)",
    (S.READY, S.STARTING): "a second process for a running service",
    (S.STOPPING, S.READY): "a stop always wins over the start it interrupts",
    (S.STOPPING, S.STARTING): "a start must wait until the stop is over",
    (S.FAILED, S.READY): "ready without starting",
    (S.FAILED, S.STOPPING): "nothing is running",
    **{(state, state): "a state change to the same state hides a logic error" for state in S},
}


def test_the_lists_above_name_every_pair_of_states_once() -> None:
    assert not set(LEGAL) & set(ILLEGAL)
    assert set(LEGAL) | set(ILLEGAL) == set(itertools.product(S, S))


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=[f"{o.value}-{n.value}" for o, n in LEGAL])
def test_legal_edge_passes(old: ServiceState, new: ServiceState) -> None:
    check_transition("svc", old, new)  # raises IllegalTransition if refused


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{o.value}-{n.value}" for o, n in ILLEGAL])
def test_illegal_edge_raises(old: ServiceState, new: ServiceState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition("svc", old, new)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (S.READY, S.STARTING, "qwen: cannot go from ready to starting (allowed: failed, stopped, stopping)"),
        (S.STOPPED, S.READY, "qwen: cannot go from stopped to ready (allowed: failed, starting)"),
        (S.STOPPING, S.READY, "qwen: cannot go from stopping to ready (allowed: failed, stopped)"),
        (S.FAILED, S.FAILED, "qwen: cannot go from failed to failed (allowed: starting, stopped)"),
    ],
)
def test_illegal_edge_names_the_service_the_states_and_the_way_out(
    old: ServiceState, new: ServiceState, message: str
) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition("qwen", old, new)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("state", "holds"),
    [(S.STOPPED, False), (S.STARTING, True), (S.READY, True), (S.STOPPING, True), (S.FAILED, False)],
)
def test_holds_memory(state: ServiceState, holds: bool) -> None:
    assert state.holds_memory is holds


def test_states_are_the_strings_status_shows() -> None:
    assert [state.value for state in S] == ["stopped", "starting", "ready", "stopping", "failed"]
    assert S("ready") is S.READY
    assert isinstance(S.STOPPING, str)

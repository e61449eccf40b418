"""The service lifecycle: which state changes are legal, written out by hand from the design.

Each expectation below is stated here, not read from ``ALLOWED_TRANSITIONS``: the test
fails if the table gains or loses an edge, whichever way.
"""

from __future__ import annotations

import itertools

import pytest

from core.supervision.service_state import IllegalTransition, ServiceState, check_transition

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
    (S.READY, S.PARKING): "evicted, or idle for park.idle, and it can park",
    (S.PARKING, S.PARKED): "its GPU memory was given back",
    (S.PARKING, S.STOPPING): "the park failed (or could not be), or an unload or shutdown came",
    (S.PARKING, S.STOPPED): "it crashed while parking",
    (S.PARKING, S.FAILED): "it crashed while parking, once too often",
    (S.PARKED, S.RESTORING): "a request came for it",
    (S.PARKED, S.STOPPING): "ttl, an unload, host room for another park, or shutdown",
    (S.PARKED, S.STOPPED): "it crashed while parked",
    (S.PARKED, S.FAILED): "it crashed while parked, once too often",
    (S.RESTORING, S.READY): "restored and warmed up",
    (S.RESTORING, S.STOPPING): "the restore failed (the next start is cold), or an unload or shutdown came",
    (S.RESTORING, S.STOPPED): "it crashed while restoring",
    (S.RESTORING, S.FAILED): "it crashed while restoring, once too often",
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
    **{(S.STOPPED, s): "parking needs a running process" for s in (S.PARKING, S.PARKED, S.RESTORING)},
    **{(S.STARTING, s): "parking needs a ready service" for s in (S.PARKING, S.PARKED, S.RESTORING)},
    **{(S.STOPPING, s): "a stop always wins" for s in (S.PARKING, S.PARKED, S.RESTORING)},
    **{(S.FAILED, s): "nothing is running" for s in (S.PARKING, S.PARKED, S.RESTORING)},
    (S.READY, S.PARKED): "parked without parking (the memory was never given back)",
    (S.READY, S.RESTORING): "nothing to restore",
    (S.PARKING, S.READY): "a park is not undone: it ends parked or stopped",
    (S.PARKING, S.STARTING): "a second process",
    (S.PARKING, S.RESTORING): "a restore must wait for the park to end",
    (S.PARKED, S.READY): "ready without restoring the weights",
    (S.PARKED, S.STARTING): "a second process (restore the parked one)",
    (S.PARKED, S.PARKING): "already parked",
    (S.RESTORING, S.STARTING): "a second process",
    (S.RESTORING, S.PARKING): "a park must wait for the restore to end",
    (S.RESTORING, S.PARKED): "a restore is not undone: it ends ready or stopped",
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
        (S.READY, S.STARTING, "qwen: cannot go from ready to starting (allowed: failed, parking, stopped, "
         "stopping)"),
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
    [(S.STOPPED, False), (S.STARTING, True), (S.READY, True), (S.STOPPING, True), (S.FAILED, False),
     (S.PARKING, True), (S.PARKED, False), (S.RESTORING, True)],
)
def test_holds_memory(state: ServiceState, holds: bool) -> None:
    assert state.holds_memory is holds


def test_states_are_the_strings_status_shows() -> None:
    assert [state.value for state in S] == ["stopped", "starting", "ready", "stopping", "failed", "parking",
                                            "parked", "restoring"]
    assert S("ready") is S.READY
    assert isinstance(S.STOPPING, str)

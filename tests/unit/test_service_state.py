"""The service lifecycle table: legal edges pass, illegal ones raise naming what went wrong."""

from __future__ import annotations

import pytest

from core.service_state import ALLOWED_TRANSITIONS, IllegalTransition, ServiceState, check_transition

S = ServiceState

ALLOWED = [(old, new) for old, targets in ALLOWED_TRANSITIONS.items() for new in sorted(targets, key=str)]
FORBIDDEN = [(old, new) for old in S for new in S if new not in ALLOWED_TRANSITIONS[old]]


def test_table_covers_every_state() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.STOPPED, S.STARTING),
        (S.STARTING, S.READY),
        (S.READY, S.STOPPING),
        (S.STOPPING, S.STOPPED),
        (S.STARTING, S.STOPPED),
        (S.STARTING, S.FAILED),
        (S.READY, S.STOPPED),
        (S.READY, S.FAILED),
        (S.FAILED, S.STOPPED),
        (S.FAILED, S.STARTING),
    ],
)
def test_documented_lifecycle_edges_are_allowed(old: ServiceState, new: ServiceState) -> None:
    assert new in ALLOWED_TRANSITIONS[old]


@pytest.mark.parametrize(("old", "new"), ALLOWED, ids=[f"{o.value}-{n.value}" for o, n in ALLOWED])
def test_allowed_edge_passes(old: ServiceState, new: ServiceState) -> None:
    check_transition("svc", old, new)  # raises IllegalTransition if refused


@pytest.mark.parametrize(
    ("old", "new"),
    [(S.READY, S.STARTING), (S.STOPPED, S.READY), (S.STOPPING, S.READY), (S.STOPPED, S.STOPPING)],
    ids=["ready-starting", "stopped-ready", "stopping-ready", "stopped-stopping"],
)
def test_illegal_edge_names_service_and_states(old: ServiceState, new: ServiceState) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition("qwen", old, new)
    message = str(info.value)
    assert message.startswith("qwen: ")
    assert f"from {old.value} to {new.value}" in message
    allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[old]))
    assert f"(allowed: {allowed})" in message


@pytest.mark.parametrize(("old", "new"), FORBIDDEN, ids=[f"{o.value}-{n.value}" for o, n in FORBIDDEN])
def test_every_unlisted_edge_raises(old: ServiceState, new: ServiceState) -> None:
    with pytest.raises(IllegalTransition):
        check_transition("svc", old, new)


def test_self_transitions_are_illegal() -> None:
    assert all(state not in ALLOWED_TRANSITIONS[state] for state in S)


@pytest.mark.parametrize(
    ("state", "holds"),
    [(S.STOPPED, False), (S.STARTING, True), (S.READY, True), (S.STOPPING, True), (S.FAILED, False)],
)
def test_holds_memory(state: ServiceState, holds: bool) -> None:
    assert state.holds_memory is holds


def test_states_are_strings() -> None:
    assert S("ready") is S.READY
    assert isinstance(S.STOPPING, str)
    assert S.STOPPING.value == "stopping"

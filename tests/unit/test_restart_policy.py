"""decide_restart: exponential backoff, a cap, giving up, and forgetting old failures."""

from __future__ import annotations

import pytest

from core.supervision.restart_policy import RestartDecision, RestartPolicy, decide_restart, recent_failures

POLICY = RestartPolicy(backoff=2.0, backoff_max=10.0, window=100.0, cooldown=50.0)


def test_defaults() -> None:
    assert RestartPolicy() == RestartPolicy(backoff=1.0, backoff_max=60.0, window=300.0, cooldown=300.0)


def test_first_failure_retries_after_backoff() -> None:
    decision = decide_restart(POLICY, [1000.0], now=1000.0, max_failures=5)
    assert decision == RestartDecision(give_up=False, not_before=1002.0)


def test_delay_counts_from_last_failure_not_now() -> None:
    decision = decide_restart(POLICY, [1000.0], now=1001.5, max_failures=5)
    assert decision == RestartDecision(give_up=False, not_before=1002.0)


@pytest.mark.parametrize(("count", "delay"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (5, 10.0), (8, 10.0)])
def test_delays_double_and_are_capped(count: int, delay: float) -> None:
    failures = [1000.0 + i for i in range(count)]
    now = failures[-1]
    decision = decide_restart(POLICY, failures, now=now, max_failures=100)
    assert decision == RestartDecision(give_up=False, not_before=now + delay)


def test_gives_up_after_max_failures_in_window() -> None:
    failures = [1000.0, 1010.0, 1020.0]
    assert not decide_restart(POLICY, failures[:2], now=1010.0, max_failures=3).give_up
    decision = decide_restart(POLICY, failures, now=1020.0, max_failures=3)
    assert decision == RestartDecision(give_up=True, not_before=1020.0 + 50.0)


def test_max_failures_one_gives_up_at_once() -> None:
    assert decide_restart(POLICY, [7.0], now=7.0, max_failures=1) == RestartDecision(True, 57.0)


def test_old_failures_are_forgotten() -> None:
    # Two failures long ago and one now: only the recent one counts, so no give-up and the first delay.
    failures = [0.0, 10.0, 1000.0]
    decision = decide_restart(POLICY, failures, now=1000.0, max_failures=3)
    assert decision == RestartDecision(give_up=False, not_before=1002.0)


def test_failure_exactly_window_old_is_forgotten() -> None:
    assert recent_failures([900.0, 900.001, 950.0], now=1000.0, window=100.0) == [900.001, 950.0]


def test_no_recent_failures_means_start_now() -> None:
    assert decide_restart(POLICY, [0.0], now=1000.0, max_failures=3) == RestartDecision(False, 1000.0)
    assert decide_restart(POLICY, [], now=5.0, max_failures=3) == RestartDecision(False, 5.0)


def test_crash_loop_then_quiet_recovers() -> None:
    loop = [0.0, 1.0, 2.0]
    assert decide_restart(POLICY, loop, now=2.0, max_failures=3).give_up
    later = [*loop, 500.0]
    assert decide_restart(POLICY, later, now=500.0, max_failures=3) == RestartDecision(False, 502.0)

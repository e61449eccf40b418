"""When to retry a service that failed, and when to give up. Pure: no clocks, no processes.

A failure is a start that did not become healthy, or a crash after it did. Failures
older than ``window`` seconds are forgotten, so a service that crashes once a day is
never marked failed, while one that crash-loops is, after ``max_failures``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    backoff: float = 1.0
    backoff_max: float = 60.0
    window: float = 300.0
    cooldown: float = 300.0


@dataclass(frozen=True)
class RestartDecision:
    give_up: bool
    not_before: float  # earliest time (same clock as the failures) of the next start


def recent_failures(failures: Sequence[float], now: float, window: float) -> list[float]:
    return [t for t in failures if now - t < window]


def decide_restart(
    policy: RestartPolicy, failures: Sequence[float], now: float, max_failures: int
) -> RestartDecision:
    """What to do after a failure, given every failure time (this one included)."""
    recent = recent_failures(failures, now, policy.window)
    if len(recent) >= max_failures:
        return RestartDecision(give_up=True, not_before=now + policy.cooldown)
    if not recent:
        return RestartDecision(give_up=False, not_before=now)
    delay = min(policy.backoff * 2 ** (len(recent) - 1), policy.backoff_max)
    return RestartDecision(give_up=False, not_before=max(recent) + delay)

"""What the metrics and the loading machinery add per request and per streamed event, timed directly.

    .venv/bin/python -m bench.metrics_cost

The proxy benchmark (bench/run.py) cannot resolve a few microseconds on a 2-core VM: two runs of
identical code differ by up to ±100 us per request from round to round. So this times, in one
process and side by side, the code a request runs with the metrics (``admit`` with its
``Answer`` and ``Ticket``, ``Metrics.request_done`` with a usage object, the per-chunk
first-byte check) against what it ran before (``Coordinator.lease`` as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import MagicMock

from model_orchestrator.loading import Answer, admit
from model_orchestrator.metrics import Metrics

N = 200_000
USAGE = b'{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}'


class Coordinator:
    """Acquire and release with nothing to wait for: only the calling code is timed."""

    def __init__(self) -> None:
        self.svc = object()

    async def acquire(self, name: str, ticket: Any = None) -> Any:
        return self.svc

    def release(self, svc: Any) -> None:
        pass

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Any]:
        svc = await self.acquire(name)
        try:
            yield svc
        finally:
            self.release(svc)


async def before(coordinator: Coordinator) -> None:
    async with coordinator.lease("m"):
        pass


async def after(coordinator: Coordinator, metrics: Metrics) -> None:
    began = time.monotonic()
    answer = Answer()
    svc = await admit(coordinator, "m", None, answer, None)  # type: ignore[arg-type]
    try:
        answer.status, answer.first_byte, answer.tail = 200, time.monotonic(), USAGE
    finally:
        coordinator.release(svc)
    metrics.request_done("m", "/v1/chat/completions", answer.status, False, began, answer.first_byte, answer.tail,
                         answer.waited)


async def per_request(n: int) -> tuple[float, float]:
    coordinator, metrics = Coordinator(), Metrics(MagicMock())
    began = time.perf_counter()
    for _ in range(n):
        await before(coordinator)
    old = (time.perf_counter() - began) / n * 1e6
    began = time.perf_counter()
    for _ in range(n):
        await after(coordinator, metrics)
    return old, (time.perf_counter() - began) / n * 1e6


def per_event(n: int) -> float:
    """The relay loop's added work per chunk: the first-byte check and keeping the last two chunks."""
    answer, chunk = Answer(), b"data: {}\n\n"
    began = time.perf_counter()
    for _ in range(n):
        pass
    empty = time.perf_counter() - began
    began = time.perf_counter()
    before = last = b""
    for _ in range(n):
        if answer.first_byte is None:
            answer.first_byte = time.monotonic()
        before, last = last, chunk
    checked = time.perf_counter() - began
    answer.tail = before + last
    return (checked - empty) / n * 1e6


def main() -> None:
    rounds = [asyncio.run(per_request(N)) for _ in range(5)]
    rounds.sort(key=lambda pair: pair[1] - pair[0])
    old, new = rounds[2]
    event = per_event(N * 10)
    print(f"per request: before {old:.2f} us, with metrics and loading {new:.2f} us: +{new - old:.2f} us "
          "(median of 5 rounds; target <= 10 us)")
    print(f"per streamed event: +{event:.3f} us (target <= 0.5 us)")


if __name__ == "__main__":
    main()

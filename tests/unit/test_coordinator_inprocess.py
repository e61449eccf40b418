"""The coordinator in-process, over fake services whose starts and stops end when the test says.

No processes and no sockets: each fake start waits for its service's ``start_may_finish``
event and each fake stop for ``stop_may_finish``, so a test can hold a model in STARTING or
STOPPING and land an unload, a lease release or another request at exactly that point.
The fakes take their state changes through ``check_transition``, so an illegal edge the
coordinator caused would fail the test.

Waiting for a condition (``until``) yields the event loop one turn at a time: everything
here is in-process and deterministic, so a condition that does not hold after many turns
never will. Wall-clock time is involved only where it is the subject (``max_wait``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from core.common.aio import done_future, joined, retrieve_exception, wait_all
from core.config.load import config_from_dict
from core.config.schema import ModelSpec
from core.supervision.service_state import ParkRecord, ServiceSnapshot, ServiceState, check_transition
from core.supervision.start_errors import StartFailed
from model_orchestrator.control import build_control_app
from model_orchestrator.coordinator import Coordinator
from model_orchestrator.refusals import Reason, Refused
from model_orchestrator.reload import Loaded
from model_orchestrator.routing import ModelIndex
from model_orchestrator.scheduler import Serve, can_serve_now

S = ServiceState
BUDGET = 40.0
BACKOFF = 30.0  # seconds a failed fake start asks before the next one


class FakeService:
    """What the coordinator uses of a ManagedService, with starts and stops the test releases."""

    def __init__(self, spec: ModelSpec, journal: list[str]) -> None:
        self.spec = spec
        self.state = S.STOPPED
        self.on_change: Callable[[], None] | None = None
        self.retiring = False
        self.failed_until = 0.0
        self.not_before = 0.0
        self.start_may_finish = asyncio.Event()
        self.stop_may_finish = asyncio.Event()
        self.start_error: str | None = None  # set: the start fails with StartFailed(start_error)
        self.starts = 0
        self.stops: list[str] = []
        self._journal = journal  # shared by all fakes: the order things happened in
        self._in_flight = 0
        self._last_used = 0.0
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.park_record = ParkRecord()
        self.parker = SimpleNamespace(parkable=False)  # parking is tested in test_warm_swap.py

    name = property(lambda self: self.spec.name)
    in_flight = property(lambda self: self._in_flight)
    last_used = property(lambda self: self._last_used)
    max_concurrency = property(lambda self: self.spec.max_concurrency)
    holds_host_copy_maybe = property(lambda self: self.state in (S.PARKING, S.PARKED, S.RESTORING))
    placed_on = property(lambda self: ())  # one GPU of BUDGET: nothing is named (tests/unit/test_placement.py)

    def begin_request(self) -> None:
        self._in_flight += 1
        self._last_used = time.monotonic()

    def end_request(self) -> None:
        self._in_flight -= 1
        self._last_used = time.monotonic()

    def snapshot(self) -> ServiceSnapshot:
        return ServiceSnapshot(spec=self.spec, state=self.state, pid=None, in_flight=self._in_flight,
                               last_used=self._last_used, started_at=None, restarts=max(0, self.starts - 1),
                               failures=0, last_error=None, command=(), park=self.park_record)

    def _set(self, new: ServiceState) -> None:
        check_transition(self.name, self.state, new)
        self.state = new
        self._journal.append(f"{self.name} {new.value}")
        if self.on_change is not None:
            self.on_change()

    def start(self, after: Sequence[Awaitable[object]] = (), devices: tuple[int, ...] = (),
              fills: Mapping[str, str] | None = None) -> asyncio.Future[None]:
        if self.state is S.STARTING and self._start_task is not None:
            return joined(self._start_task)
        self._set(S.STARTING)
        self.starts += 1
        self._start_task = asyncio.create_task(self._run_start(list(after)))
        self._start_task.add_done_callback(retrieve_exception)
        return joined(self._start_task)

    async def _run_start(self, after: list[Awaitable[object]]) -> None:
        await wait_all(after)
        await self.start_may_finish.wait()
        if self.start_error is not None:
            self.not_before = time.monotonic() + BACKOFF
            self._set(S.STOPPED)
            raise StartFailed(self.start_error)
        self._last_used = time.monotonic()
        self._set(S.READY)

    def stop(self, reason: str = "requested") -> asyncio.Future[None]:
        if self.state in (S.STOPPED, S.FAILED):
            return done_future()
        if self.state is not S.STOPPING:
            self.stops.append(reason)
            self._set(S.STOPPING)
        if self._stop_task is None or self._stop_task.done():
            self._stop_task = asyncio.create_task(self._run_stop())
            self._stop_task.add_done_callback(retrieve_exception)
        return joined(self._stop_task)

    async def _run_stop(self) -> None:
        start = self._start_task
        if start is not None and not start.done():
            start.cancel()
            await asyncio.wait({start})
        await self.stop_may_finish.wait()
        self._set(S.STOPPED)

    def fail_until(self, until: float) -> None:
        """Mark it FAILED (as the restart policy does after too many failures) until ``until``."""
        self.failed_until = until
        self._set(S.FAILED)

    def reset(self) -> None:
        self.failed_until = self.not_before = 0.0
        if self.state is S.FAILED:
            self._set(S.STOPPED)


class FakeManager:
    def __init__(self, specs: dict[str, ModelSpec]) -> None:
        self.journal: list[str] = []
        self.services = {name: FakeService(spec, self.journal) for name, spec in specs.items()}

    def __getitem__(self, name: str) -> FakeService:
        return self.services[name]


def run(scenario: Callable[[Coordinator, FakeManager], Awaitable[None]], *, models: dict[str, dict[str, Any]],
        **settings: Any) -> None:
    """Run ``scenario`` with a coordinator over fake services for ``models`` (budget 40 GB)."""
    raw = {"settings": settings,
           "models": {name: {"type": "text", "command": "unused", "port": 9100 + i, **spec}
                      for i, (name, spec) in enumerate(models.items())}}
    config = config_from_dict(raw, Path("models.yaml"))

    async def main() -> None:
        manager = FakeManager(config.models)
        coordinator = Coordinator(cast(Any, manager), config.settings, BUDGET)
        await scenario(coordinator, manager)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # requests a scenario left waiting, fakes left starting
    asyncio.run(main())


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let other tasks run, one loop turn at a time, until ``predicate`` holds."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)  # one loop turn, no wall-clock wait
    raise AssertionError(f"never happened: {what}")


async def turns(count: int) -> None:
    """Let every runnable task go ``count`` loop turns further (to show something does NOT happen)."""
    for _ in range(count):
        await asyncio.sleep(0)  # one loop turn, no wall-clock wait


def request(coordinator: Coordinator, name: str) -> asyncio.Task[Any]:
    """One request's acquire(), running as its own task (as each proxied request does)."""
    return asyncio.create_task(coordinator.acquire(name))


async def refusal(coordinator: Coordinator, name: str) -> Refused:
    with pytest.raises(Refused) as info:
        await coordinator.acquire(name)
    return info.value


# --- races around a start ----------------------------------------------------------------


def test_unload_during_a_start_with_waiters_stops_it_and_the_waiters_get_a_fresh_start() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        waiters = [request(coordinator, "a"), request(coordinator, "a")]
        await until(lambda: a.state is S.STARTING and coordinator.waiting("a") == 2, "both requests wait for a start")
        unload = asyncio.create_task(coordinator.unload("a"))
        await until(lambda: a.state is S.STOPPING, "the unload stops a mid-start")
        assert coordinator.status()["a"].waiting == 2  # still waiting: an unload is no refusal
        a.stop_may_finish.set()
        await unload
        await until(lambda: a.starts == 2, "the waiters start a again once it has stopped")
        assert not any(w.done() for w in waiters)
        a.start_may_finish.set()
        served = await asyncio.gather(*waiters)
        assert served == [a, a] and a.in_flight == 2
        assert a.stops == ["unloaded by operator"]
        assert manager.journal == ["a starting", "a stopping", "a stopped", "a starting", "a ready"]
        for svc in served:
            coordinator.release(svc)
        assert a.in_flight == 0 and coordinator.waiting("a") == 0
    run(scenario, models={"a": {"vram_gb": 10}})


def test_every_waiter_of_a_failed_start_is_refused_with_start_failed_and_the_backoff() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        a.start_error = "exited with status 1 during start"
        waiters = [request(coordinator, "a"), request(coordinator, "a")]
        await until(lambda: coordinator.waiting("a") == 2, "both requests wait for the start")
        a.start_may_finish.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        for refused in results:
            assert isinstance(refused, Refused)
            assert refused.reason is Reason.START_FAILED
            assert refused.message == "Model 'a' failed to start: exited with status 1 during start"
            assert refused.retry_after is not None and BACKOFF - 5 < refused.retry_after <= BACKOFF
        assert a.starts == 1 and a.state is S.STOPPED and coordinator.waiting("a") == 0
    run(scenario, models={"a": {"vram_gb": 10}})


def test_a_start_that_never_ends_times_the_waiter_out_but_keeps_going() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        refused = await refusal(coordinator, "a")
        assert refused.reason is Reason.WAIT_TIMEOUT and refused.retry_after == 10
        assert refused.message == "Timed out after 0.05s waiting for model 'a' (state: starting); retry later."
        assert manager["a"].state is S.STARTING  # giving up the wait does not abort the start
        assert coordinator.waiting("a") == 0
    run(scenario, models={"a": {"vram_gb": 10}}, max_wait=0.05)


def test_a_full_queue_refuses_at_once_without_touching_the_waiters() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        waiters = [request(coordinator, "a"), request(coordinator, "a")]
        await until(lambda: coordinator.waiting("a") == 2, "the queue fills")
        refused = await refusal(coordinator, "a")
        assert (refused.reason, refused.retry_after) == (Reason.QUEUE_FULL, 5)
        assert refused.message == "Too many requests are waiting for model 'a' (max_queue 2); retry later."
        a.start_may_finish.set()
        assert await asyncio.gather(*waiters) == [a, a]
    run(scenario, models={"a": {"vram_gb": 10}}, max_queue=2)


# --- leases, eviction and the fast path ---------------------------------------------------


def test_eviction_waits_until_the_held_lease_is_released() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a, b = manager["a"], manager["b"]
        a.start_may_finish.set()
        held = await coordinator.acquire("a")
        b_request = request(coordinator, "b")  # b needs a's memory
        await until(lambda: coordinator.waiting("b") == 1, "b's request waits")
        assert a.stops == [] and b.state is S.STOPPED  # a serves its request undisturbed
        coordinator.release(held)
        await until(lambda: a.state is S.STOPPING and b.state is S.STARTING, "b's swap begins once a is idle")
        assert a.stops == ["evicted for b"]
        b.start_may_finish.set()  # b may load, but not before a has given its memory back
        await turns(50)
        assert b.state is S.STARTING and not b_request.done()
        a.stop_may_finish.set()
        assert await b_request is b
        assert manager.journal == ["a starting", "a ready", "a stopping", "b starting", "a stopped", "b ready"]
    run(scenario, models={"a": {"vram_gb": 30}, "b": {"vram_gb": 30}})


def test_with_nobody_waiting_the_fast_path_and_the_plan_agree_in_every_state() -> None:
    # The fast path reads the live service; plan() a snapshot the coordinator builds of it.
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]

        def agree(expected: bool) -> None:
            assert can_serve_now(cast(Any, a)) is expected
            assert (coordinator.decide("a") == Serve()) is expected, a.state

        agree(False)  # stopped
        starting = a.start()
        agree(False)
        a.start_may_finish.set()
        await starting
        agree(True)  # ready, 0 of 2
        leases = [await coordinator.acquire("a"), await coordinator.acquire("a")]
        agree(False)  # ready, 2 of 2
        coordinator.release(leases.pop())
        agree(True)
        coordinator.release(leases.pop())
        stopping = a.stop()
        agree(False)
        a.stop_may_finish.set()
        await stopping
        a.fail_until(time.monotonic() + 60)
        agree(False)
    run(scenario, models={"a": {"vram_gb": 10, "max_concurrency": 2}})


def test_past_max_concurrency_a_request_queues_until_a_lease_is_released() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        a.start_may_finish.set()
        await coordinator.load("a")
        first, second = await coordinator.acquire("a"), await coordinator.acquire("a")
        third = request(coordinator, "a")
        await until(lambda: coordinator.waiting("a") == 1, "the third request queues")
        coordinator.release(first)
        assert await third is a and a.in_flight == 2
        for svc in (second, a):
            coordinator.release(svc)
        assert a.in_flight == 0
    run(scenario, models={"a": {"vram_gb": 10, "max_concurrency": 2}})


def test_a_model_closing_for_a_waiter_elsewhere_does_not_take_the_fast_path() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        a.start_may_finish.set()
        held = await coordinator.acquire("a")
        request(coordinator, "b")  # needs a's memory; with batch_window 0, a closes at once
        await until(lambda: coordinator.waiting("b") == 1, "b's request waits")
        late = request(coordinator, "a")
        await until(lambda: coordinator.waiting("a") == 1, "a late request for a queues")
        assert can_serve_now(a) and a.in_flight == 1  # a has room, yet the late request is not served
        assert not late.done()
        coordinator.release(held)
        await until(lambda: a.state is S.STOPPING, "a drained and is evicted for b")
        assert a.in_flight == 0 and not late.done()
    run(scenario, models={"a": {"vram_gb": 30}, "b": {"vram_gb": 30}}, batch_window=0)


# --- refusals from the plan -----------------------------------------------------------------


def test_a_model_cooling_down_is_refused_until_reset() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        a.fail_until(time.monotonic() + 60)
        refused = await refusal(coordinator, "a")
        assert refused.reason is Reason.COOLING_DOWN
        assert refused.message == "model 'a' failed repeatedly and is cooling down"
        assert refused.retry_after is not None and 55 < refused.retry_after <= 60
        assert a.starts == 0
        coordinator.reset("a")
        a.start_may_finish.set()
        assert await coordinator.acquire("a") is a and a.starts == 1
    run(scenario, models={"a": {"vram_gb": 10}})


# --- the control app maps a refusal like the proxy, and shows the coordinator's status --------


async def control(coordinator: Coordinator, manager: FakeManager, method: str, path: str) -> httpx.Response:
    config = config_from_dict({"models": {name: {"type": "text", "command": "unused", "port": svc.spec.port,
                                                 "vram_gb": svc.spec.vram_gb}
                                          for name, svc in manager.services.items()}}, Path("models.yaml"))
    runtime = SimpleNamespace(coordinator=coordinator, manager=manager, index=ModelIndex(config), gpus=[],
                              config=config, loaded=Loaded("0123456789ab", 0.0, "start"))
    app = build_control_app(cast(Any, runtime))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://control") as client:
        return await client.request(method, path)


def test_a_refused_load_is_answered_with_the_same_envelope_as_a_refused_request() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        manager["a"].start_error = "not healthy after 20s (startup_time)"
        manager["a"].start_may_finish.set()
        failed = await control(coordinator, manager, "POST", "/admin/models/a/load")
        assert failed.status_code == 503 and BACKOFF - 5 < int(failed.headers["retry-after"]) <= BACKOFF
        assert failed.json() == {"error": {"message": "Model 'a' failed to start: not healthy after 20s (startup_time)",
                                           "type": "server_error", "code": "model_start_failed", "param": None}}
        too_big = await control(coordinator, manager, "POST", "/admin/models/huge/load")
        assert too_big.status_code == 503 and "retry-after" not in too_big.headers
        assert too_big.json()["error"]["code"] == "insufficient_gpu_memory"
    run(scenario, models={"a": {"vram_gb": 10}, "huge": {"vram_gb": 50}})


def test_status_shows_the_coordinators_snapshot_and_queue() -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a = manager["a"]
        request(coordinator, "a")
        await until(lambda: coordinator.waiting("a") == 1, "a request waits for a's start")
        status = (await control(coordinator, manager, "GET", "/status")).json()
        assert status["gpu_budget_gb"] == BUDGET
        assert status["models"]["a"] == {
            "state": "starting", "pid": None, "port": a.spec.port, "vram_gb": 10.0, "in_flight": 0, "waiting": 1,
            "idle_seconds": None, "started_at": None, "restarts": 0, "failures": 0, "last_error": None,
            "pinned": False, "ttl": 0.0, "command": [], "devices": [], "vram_used_gb": None,  # no NVML here
            "park": {"enabled": True, "level": None, "host_gb": None, "parks": 0, "restores": 0, "failures": 0,
                     "last_seconds": None, "last_error": None, "unsupported": None},
        }
        models = (await control(coordinator, manager, "GET", "/v1/models")).json()["data"]
        assert [(m["id"], m["state"]) for m in models] == [("a", "starting")]
    run(scenario, models={"a": {"vram_gb": 10}})


# --- the GPU budget counts each process's own overhead (#20) ------------------------------------------


@pytest.mark.parametrize(("overhead", "evicted"), [(0.5, True), (0.0, False)])
def test_two_shares_that_fit_only_without_their_contexts_take_turns(overhead: float, evicted: bool) -> None:
    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        a, b = manager["a"], manager["b"]
        first = request(coordinator, "a")
        a.start_may_finish.set()
        coordinator.release(await first)
        second = request(coordinator, "b")
        if evicted:  # 19.5 + 0.5 + 20 + 0.5 > 40: a must go first
            await until(lambda: a.state is S.STOPPING, "a stopping for b")
            a.stop_may_finish.set()
        b.start_may_finish.set()
        coordinator.release(await second)
        assert (a.state, b.state) == ((S.STOPPED if evicted else S.READY), S.READY)
        assert coordinator.views()["a"].overhead_gb == overhead
        assert coordinator.views()["cpu"].overhead_gb == 0.0  # vram_gb 0: no GPU, no context

    run(scenario, models={"a": {"vram_gb": 19.5}, "b": {"vram_gb": 20}, "cpu": {"vram_gb": 0}},
        gpu_process_overhead_gb=overhead)


def test_a_measured_zero_never_undercuts_the_declared_host_size() -> None:
    # #19: the vLLM engine said pinned_host_bytes 0 when it could not find its weight files, and the
    # coordinator preferred that 0 to park.host_gb: a 14 GB park counted as free.
    from dataclasses import replace

    async def scenario(coordinator: Coordinator, manager: FakeManager) -> None:
        q = manager["q"]
        q.state = S.PARKED
        q.park_record = replace(q.park_record, level=1, host_bytes=0)
        assert coordinator.views()["q"].host_gb == 14
        assert coordinator.views()["q"].park_host_gb == 14
        q.park_record = replace(q.park_record, host_bytes=20 * 1024**3)  # more than declared: the measure
        assert coordinator.views()["q"].host_gb == 20

    run(scenario, models={"q": {"vram_gb": 20, "park": {"host_gb": 14}}})

"""The real coordinator and service state machine in-process, over fakes the test drives step by step.

``World`` builds real ``ManagedService`` objects (core/supervision/managed_service.py) and a real ``Coordinator``
(model-orchestrator/coordinator.py) for one config, and replaces only what touches the OS or the
network, per service:

* ``_process`` (core/supervision/service_process.py) by ``FakeProcess``: a spawn, a kill and the health probe
  of a start each wait for the test to resolve them; a crash is the test ending the fake leader,
  whose exit watch then calls the service's ``_on_exit`` as ``ServiceProcess._watch_exit`` does
  (and ``kill()`` waits for that watch, as the real one does);
* ``parker`` (core/supervision/park_client.py) by ``FakeParker``: each park and restore call waits likewise;
* ``probe`` (the health probe ``wait_healthy`` calls), and ``core.supervision.readiness.tcp_connects``.

Every such call is an open ``Step`` (``World.pending``) until the test resolves it with an outcome
("ok", or a failure of that kind of step); a step left open is a hang. Nothing sleeps on the wall
clock: everything runs on one ``VirtualLoop`` whose clock moves only when the test says
(``World.advance``), and the modules under test read ``time.monotonic()`` from that clock
(``virtual_time``). Between steps the loop is run until nothing can run (``World.settle``), so a
run is deterministic.

The fakes also track what the processes physically hold (``Leader.gpu_gb``/``host_gb``): on the GPU,
a process's CUDA context (``gpu_process_overhead_gb``; "auto" as on a GPU) from a spawn's first moment
until the leader exits, and its ``vram_gb`` too except while parked (given back once a park succeeds,
taken again when a restore begins; parked it keeps ``park.vram_kept_gb``); in host memory, the park's
copy from a park's first moment until a restore ends or the leader exits. ``World.check()`` holds the
coordinator to the budgets on that, not on its own view of it.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

import pytest
from typing_extensions import TypeVarTuple, Unpack

from core.config.load import config_from_dict
from core.config.schema import ModelSpec
from core.host.gpu import GPU_PROCESS_OVERHEAD_GB
from core.host.memory_share import GIB
from core.service_manager import ManagedService
from core.supervision import managed_service, park_client, readiness, service_park
from core.supervision.log_capture import ServiceLog
from core.supervision.park_client import ParkFailed, ParkOutcome, ParkUnsupported, calls_of
from core.supervision.restart_policy import RestartPolicy
from core.supervision.service_state import ServiceState
from core.supervision.start_errors import StartFailed
from model_orchestrator import coordinator as coordinator_module
from model_orchestrator.coordinator import Coordinator
from model_orchestrator.refusals import Refused, http_error
from model_orchestrator.scheduler import idle_action

S = ServiceState
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

MAX_TURNS = 20_000  # loop turns a settle may take; more means something spins without waiting (a livelock)
START_CLOCK = 1000.0  # the virtual clock's start: last_used 0.0 ("never") lies far in the past

# The outcomes a step can be resolved with; the first is the step succeeding.
OUTCOMES: dict[str, tuple[str, ...]] = {
    "spawn": ("ok", "port_in_use", "emfile", "bug"),  # StartFailed, OSError EMFILE (not counted), RuntimeError
    "health": ("healthy", "unhealthy", "emfile"),  # 200, not yet (wait_healthy polls again), our fds ran out
    "park": ("ok", "failed", "unsupported", "bug"),
    "restore": ("ok", "failed", "bug"),
    "kill": ("ok",),  # a kill always ends, when the test says (terminate, SIGKILL, sweep)
}


# --- the clock -----------------------------------------------------------------------------------


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is ``now``, moved only by the test; executors run inline."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START_CLOCK

    def time(self) -> float:
        return self.now

    def run_in_executor(self, executor: Executor | None, func: Callable[[Unpack[Ts]], T], *args: Unpack[Ts]
                        ) -> asyncio.Future[T]:
        """``asyncio.to_thread`` (the park's NVML reads) inline: no thread, so no real-time race."""
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def runnable(self) -> bool:
        """Something other than the caller can run now: a ready callback or a timer that is due."""
        ready = self._ready  # type: ignore[attr-defined]
        scheduled = self._scheduled  # type: ignore[attr-defined]
        return bool(ready) or any(not h.cancelled() and h.when() <= self.now for h in scheduled)

    def next_timer(self) -> float | None:
        """When the earliest pending timer is due (None: no timer)."""
        scheduled = [h.when() for h in self._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return min(scheduled) if scheduled else None


class _VirtualTime:
    """Stands in for the ``time`` module in the modules under test: ``monotonic()`` is the loop's clock."""

    def __init__(self) -> None:
        self.loop: VirtualLoop | None = None

    def monotonic(self) -> float:
        assert self.loop is not None, "virtual time read outside a World"
        return self.loop.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


CLOCK = _VirtualTime()
_TIMED_MODULES: tuple[ModuleType, ...] = (managed_service, coordinator_module, readiness, park_client)


async def _port_open(host: str, port: int, timeout: float) -> bool:
    return True  # the fake's health probe decides


def virtual_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the modules under test read the current World's clock, and never open a socket or ask NVML."""
    for module in _TIMED_MODULES:
        monkeypatch.setattr(module, "time", CLOCK)
    monkeypatch.setattr(readiness, "tcp_connects", _port_open)
    monkeypatch.setattr(service_park, "gpu_held", lambda pid: None)  # NVML: nothing to check against


_SETTLED = frozenset({S.READY, S.PARKED, S.STOPPED, S.FAILED})  # no operation under way


# --- steps -------------------------------------------------------------------------------------


@dataclass(eq=False)
class Step:
    """One call of a fake that waits for the test: ``future`` gets the outcome."""

    kind: str
    service: str
    future: asyncio.Future[str]

    @property
    def open(self) -> bool:
        return not self.future.done()

    def __repr__(self) -> str:
        return f"<{self.kind} {self.service}>"


@dataclass(eq=False)
class Leader:
    """One spawned fake process (what ``ServiceProcess.process`` would be)."""

    service: str
    exit: asyncio.Future[int]
    spec: ModelSpec
    overhead_gb: float  # its CUDA context
    parked: bool = False  # its vram_gb given back (a park succeeded, no restore began since)
    host_gb: float = 0.0  # host memory its park copy holds
    watch: asyncio.Task[int] | None = None

    @property
    def gpu_gb(self) -> float:
        kept = self.spec.park.vram_kept_gb if self.parked else self.spec.vram_gb or 0.0
        return self.overhead_gb + kept

    @property
    def alive(self) -> bool:
        return not self.exit.done()


class FakeProcess:
    """``ServiceProcess`` for one service, with spawns, kills and probes the test resolves."""

    def __init__(self, world: World, spec: ModelSpec, on_exit: Callable[[Any, int | None], Coroutine[Any, Any, None]]
                 ) -> None:
        self.world = world
        self.spec = spec
        self.name = spec.name
        self._on_exit = on_exit
        self.process: Leader | None = None  # the one ManagedService may still kill
        self.leaders: list[Leader] = []  # every process spawned so far
        self.spawns = 0
        self.spawning = False  # a spawn is under way: count its memory from now
        self._exit_task: asyncio.Task[int] | None = None

    @property
    def pid(self) -> int | None:
        return None  # no NVML lookups on a fake

    def live(self) -> list[Leader]:
        return [leader for leader in self.leaders if leader.alive]

    async def spawn(self, host: str, port: int, env: Mapping[str, str] | None = None,
                    argv: list[str] | None = None) -> None:
        if self.live():
            self.world.violation(f"{self.name}: spawn while an earlier process of it is alive")
        self.spawning = True
        try:
            outcome = await self.world.gate("spawn", self.name)
        finally:
            self.spawning = False
        if outcome == "port_in_use":
            raise StartFailed(f"port {port} is already in use by pid 4242 (someone else)")
        if outcome == "emfile":
            raise OSError(errno.EMFILE, "Too many open files")
        if outcome == "bug":
            raise RuntimeError("a bug in spawn")
        self.spawns += 1
        leader = Leader(self.name, self.world.loop.create_future(), self.spec, self.world.overhead_gb(self.spec))
        self.leaders.append(leader)
        self.process = leader
        leader.watch = self._exit_task = asyncio.create_task(self._watch_exit(leader), name=f"exit:{self.name}")

    async def _watch_exit(self, leader: Leader) -> int:
        returncode = await leader.exit
        await self._on_exit(leader, returncode)  # in this task: kill() waits for what it settles
        return returncode

    def with_log_tail(self, message: str) -> str:
        return message

    def exited(self) -> bool:
        assert self._exit_task is not None, "not spawned"
        return self._exit_task.done()

    def exit_status(self) -> int | None:
        assert self._exit_task is not None and self._exit_task.done(), "still running"
        return self._exit_task.result()

    async def output_or_exit(self, timeout: float) -> None:
        assert self._exit_task is not None, "not spawned"
        await asyncio.wait({self._exit_task}, timeout=timeout)

    async def kill(self, timeout: float) -> None:
        leader = self.process
        if leader is None:
            return
        await self.world.gate("kill", self.name)  # SIGTERM, SIGKILL, the sweep: done when the test says
        if leader.alive:
            leader.exit.set_result(-15)
        watch = leader.watch
        if watch is not None and watch is not asyncio.current_task():
            await asyncio.wait({watch})  # a crash it saw is settled
        if self.process is leader:
            self.process = None

    def crash(self, returncode: int = 1) -> None:
        leader = self.process
        assert leader is not None and leader.alive
        leader.exit.set_result(returncode)

    async def probe(self, timeout: float = 5.0) -> bool:
        """The start's health probe (``wait_healthy``); False at once if the process exits meanwhile."""
        leader = self.process
        outcome = await self.world.gate("health", self.name, also=leader.exit if leader else None)
        if outcome == "emfile":
            raise OSError(errno.EMFILE, "Too many open files")
        return outcome == "healthy"


class FakeParker:
    """``ParkClient`` for one service: park and restore calls the test resolves."""

    def __init__(self, world: World, spec: ModelSpec, process: FakeProcess) -> None:
        self.world = world
        self.spec = spec
        self.process = process
        self.parkable = calls_of(spec) is not None  # as the real ParkClient has it
        self.parks = 0

    def _host_gb(self, level: int) -> float:
        return 0.0 if level == 2 else self.spec.park.host_gb or self.spec.vram_gb or 0.0

    async def park(self, level: int) -> ParkOutcome:
        leader = self.process.process
        if leader is None or not leader.alive or leader.parked:
            self.world.violation(f"{self.spec.name}: a park of a process that is gone or parked already")
            raise ParkFailed("connection refused")
        leader.host_gb = self._host_gb(level)  # copying to host memory from the first moment
        outcome = await self.world.gate("park", self.spec.name, also=leader.exit)
        if outcome is None:
            raise ParkFailed("park failed: connection reset (the service exited)")
        if outcome == "ok":
            leader.parked = True
            self.parks += 1
            return ParkOutcome(0.25, int(leader.host_gb * GIB) if self.world.reports_host_bytes else None)
        leader.host_gb = 0.0  # it gave up the copy
        if outcome == "failed":
            raise ParkFailed("park failed: POST /offload answered 500: out of host memory")
        if outcome == "unsupported":
            raise ParkUnsupported("this engine cannot offload")
        raise RuntimeError("a bug in park")

    async def restore(self, level: int) -> ParkOutcome:
        leader = self.process.process
        if leader is None or not leader.alive or not leader.parked:
            self.world.violation(f"{self.spec.name}: a restore of a process that is gone or not parked")
            raise ParkFailed("connection refused")
        leader.parked = False  # loading back from the first moment
        outcome = await self.world.gate("restore", self.spec.name, also=leader.exit)
        if outcome is None:
            raise ParkFailed("restore failed: connection reset (the service exited)")
        if outcome == "ok":
            leader.host_gb = 0.0
            return ParkOutcome(0.25, None)
        if outcome == "failed":
            raise ParkFailed("restore failed: POST /restore answered 500: CUDA out of memory")
        raise RuntimeError("a bug in restore")


# --- requests and operator actions ---------------------------------------------------------------


@dataclass(eq=False)
class Request:
    """One request's lease: ``acquire()`` in its own task, held until released."""

    model: str
    arrival: float
    task: asyncio.Task[ManagedService] | None = None
    granted_state: ServiceState | None = None  # the state of the service the moment it was granted
    granted_alive: bool = False  # its process was alive and not parked then
    released: bool = False
    disconnected: bool = False  # the test cancelled it (a client hanging up)

    @property
    def holds(self) -> bool:
        return self.granted_state is not None and not self.released


@dataclass(eq=False)
class AdminCall:
    kind: str  # "load", "park", "unload"
    model: str
    arrival: float
    task: asyncio.Task[Any]


@dataclass
class _Manager:
    """What the coordinator uses of a ServiceManager."""

    services: dict[str, ManagedService] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ManagedService:
        return self.services[name]


def build_config(models: dict[str, dict[str, Any]], **settings: Any) -> Any:
    """A config of `command` models on ports 9100 and up, parking (the `vllm` calls) unless `park.enabled` is false."""
    defaults = {"max_wait": 10, "batch_window": 0.5, "max_queue": 3, "restart_backoff": 1, "restart_backoff_max": 4,
                "failed_cooldown": 20, "health_interval": 0, "health_failures": 2}
    raw = {"settings": {**defaults, **settings},
           "models": {name: {"type": "text", "command": "unused", "port": 9100 + i, "startup_time": 20, **spec,
                             "park": {"calls": "vllm", **spec.get("park", {})}}
                      for i, (name, spec) in enumerate(models.items())}}
    return config_from_dict(raw, Path("models.yaml"))


class World:
    """One config's services and coordinator on a virtual-time loop, driven step by step."""

    def __init__(self, models: dict[str, dict[str, Any]], *, gpu_gb: float, host_gb: float | None,
                 reports_host_bytes: bool = True, ttl_watch: bool = True, **settings: Any) -> None:
        self.loop = VirtualLoop()
        CLOCK.loop = self.loop
        self.config = build_config(models, **settings)
        self.settings = self.config.settings
        self.gpu_gb = gpu_gb
        self.host_gb = host_gb
        self.reports_host_bytes = reports_host_bytes  # a park says how much host memory it holds (vLLM may not)
        configured = self.settings.gpu_process_overhead_gb  # each process's CUDA context ("auto": as on a GPU)
        self.process_overhead_gb = GPU_PROCESS_OVERHEAD_GB if isinstance(configured, str) else configured
        self.pending: list[Step] = []
        self.requests: list[Request] = []
        self.admin: list[AdminCall] = []
        self.violations: list[str] = []
        self.broken = False  # a check failed: teardown only cleans up
        self.manager = _Manager()
        self.fakes: dict[str, FakeProcess] = {}
        self.parkers: dict[str, FakeParker] = {}
        policy = RestartPolicy(self.settings.restart_backoff, self.settings.restart_backoff_max,
                               self.settings.restart_window, self.settings.failed_cooldown)
        for name, spec in self.config.models.items():
            svc = ManagedService(spec, argv=["unused"], env={}, service_log=ServiceLog(name, None), policy=policy,
                                 health=cast(Any, None), reaper=None, health_interval=0,
                                 health_failures=self.settings.health_failures)
            fake = self.fakes[name] = FakeProcess(self, spec, svc._on_exit)
            parker = self.parkers[name] = FakeParker(self, spec, fake)
            svc._process = cast(Any, fake)
            svc.parker = cast(Any, parker)
            cast(Any, svc).probe = fake.probe
            self.manager.services[name] = svc
        self.coordinator = Coordinator(cast(Any, self.manager), self.settings, gpu_gb, host_budget_gb=host_gb,
                                       overhead_gb=self.process_overhead_gb)
        if ttl_watch:
            self.run(self.coordinator.start_ttl_watch)

    @property
    def services(self) -> dict[str, ManagedService]:
        return self.manager.services

    @property
    def now(self) -> float:
        return self.loop.now

    def violation(self, message: str) -> None:
        self.violations.append(message)

    # -- running the loop --------------------------------------------------------------------

    async def settle(self) -> None:
        """Run the loop until nothing can run without the test (a step resolved, the clock moved)."""
        idle = 0
        for _ in range(MAX_TURNS):
            await asyncio.sleep(0)
            idle = 0 if self.loop.runnable() else idle + 1
            if idle >= 2:
                return
        raise AssertionError(f"the loop never settled in {MAX_TURNS} turns: something spins without waiting")

    def run(self, action: Callable[[], T]) -> T:
        """``action()`` on the loop (it may begin tasks), then settle."""
        async def body() -> T:
            result = action()
            await self.settle()
            return result
        try:
            return self.loop.run_until_complete(body())
        except BaseException:
            self.broken = True
            raise

    def gate(self, kind: str, service: str, also: asyncio.Future[Any] | None = None) -> Coroutine[Any, Any, str | None]:
        """Wait for the test to resolve a ``kind`` step of ``service`` (None: ``also`` ended first)."""
        step = Step(kind, service, self.loop.create_future())
        self.pending.append(step)

        async def wait() -> str | None:
            try:
                if also is None:
                    return await step.future
                await asyncio.wait({step.future, also}, return_when=asyncio.FIRST_COMPLETED)
                return step.future.result() if step.future.done() else None
            finally:
                self.pending.remove(step)
        return wait()

    def open_steps(self, kind: str | None = None, service: str | None = None) -> list[Step]:
        return [s for s in self.pending if s.open and (kind is None or s.kind == kind)
                and (service is None or s.service == service)]

    def step(self, kind: str, service: str) -> Step:
        """The one open ``kind`` step of ``service``."""
        steps = self.open_steps(kind, service)
        assert len(steps) == 1, f"expected one open {kind} step of {service}, found {self.open_steps()}"
        return steps[0]

    def resolve(self, step: Step, outcome: str | None = None) -> None:
        assert step.open, f"{step} is not open"
        outcome = OUTCOMES[step.kind][0] if outcome is None else outcome
        assert outcome in OUTCOMES[step.kind], outcome
        self.run(lambda: step.future.set_result(outcome))

    def finish(self, kind: str, service: str, outcome: str | None = None) -> None:
        self.resolve(self.step(kind, service), outcome)

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, firing each timer at its own time on the way."""
        target = self.now + seconds

        async def body() -> None:
            await self.settle()
            for _ in range(MAX_TURNS):
                due = self.loop.next_timer()
                if due is None or due > target:
                    break
                self.loop.now = max(self.loop.now, due)
                await self.settle()
            else:
                raise AssertionError("timers kept firing without the clock moving")
            self.loop.now = target
            await self.settle()
        try:
            self.loop.run_until_complete(body())
        except BaseException:
            self.broken = True
            raise

    def crash(self, name: str, returncode: int = 1) -> None:
        self.run(lambda: self.fakes[name].crash(returncode))

    # -- requests and operator actions ---------------------------------------------------------

    def request(self, name: str, *, hold: bool = True) -> Request:
        """A request for ``name``: its lease is held until ``release``, or without ``hold`` given back at
        once (a request that takes no time)."""
        req = Request(name, self.now)

        async def lease() -> ManagedService:
            svc = await self.coordinator.acquire(name)
            leader = self.fakes[name].process
            req.granted_state = svc.state
            req.granted_alive = leader is not None and leader.alive and not leader.parked
            if not hold:
                req.released = True
                self.coordinator.release(svc)
            return svc

        def begin() -> None:
            req.task = asyncio.create_task(lease(), name=f"request:{name}")
        self.requests.append(req)
        self.run(begin)
        return req

    def release(self, req: Request) -> None:
        assert req.holds
        req.released = True
        self.run(lambda: self.coordinator.release(self.services[req.model]))

    def disconnect(self, req: Request) -> None:
        assert req.task is not None and not req.task.done()
        req.disconnected = True
        self.run(req.task.cancel)

    def call(self, kind: str, name: str) -> AdminCall:
        """An operator's load, park or unload, in its own task (as the control app runs it)."""
        calls: dict[str, Callable[[str], Coroutine[Any, Any, Any]]] = {
            "load": self.coordinator.load, "park": self.coordinator.park, "unload": self.coordinator.unload}
        holder: list[AdminCall] = []

        def begin() -> None:
            holder.append(AdminCall(kind, name, self.now, asyncio.create_task(calls[kind](name), name=kind)))
        self.run(begin)
        self.admin.append(holder[0])
        return holder[0]

    def held(self, name: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.holds and (name is None or r.model == name)]

    def waiting(self) -> list[Request]:
        return [r for r in self.requests if r.task is not None and not r.task.done()]

    # -- what is physically held --------------------------------------------------------------

    def gpu_in_use(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, fake in self.fakes.items():
            gb = sum(leader.gpu_gb for leader in fake.live())
            if fake.spawning:
                gb += (fake.spec.vram_gb or 0.0) + self.overhead_gb(fake.spec)
            if gb:
                used[name] = gb
        return used

    def overhead_gb(self, spec: ModelSpec) -> float:
        return 0.0 if spec.vram_gb == 0 else self.process_overhead_gb

    def host_in_use(self) -> dict[str, float]:
        """Host memory the live processes hold (their park copies)."""
        used: dict[str, float] = {}
        for name, fake in self.fakes.items():
            gb = sum(leader.host_gb for leader in fake.live())
            if gb:
                used[name] = gb
        return used

    # -- invariants ----------------------------------------------------------------------------

    def check(self) -> None:
        """Every invariant, now (between steps, with the loop settled)."""
        try:
            self._check()
        except BaseException:
            self.broken = True
            raise

    def _check(self) -> None:
        assert not self.violations, self.violations
        states = {name: svc.state.value for name, svc in self.services.items()}
        self._check_memory(states)
        self._check_services()
        self._check_answers(states)
        ttl = self.coordinator._ttl_task
        if ttl is not None:
            assert not ttl.done(), f"the idle watch ended: {ttl.exception() if not ttl.cancelled() else 'cancelled'}"
            views = self.coordinator.views()
            for name in self.services:  # the idle watch acts when a timer runs out, never later
                overdue = idle_action(name, views, self.now, self.host_gb).action
                assert overdue is None, f"{name}: its idle timer ran out and it is not {overdue}ed; {states}"

    def _check_memory(self, states: dict[str, str]) -> None:
        """The budgets hold for what the processes hold, and for what the coordinator counts as parked."""
        gpu = self.gpu_in_use()
        assert sum(gpu.values()) <= self.gpu_gb + 1e-9, f"GPU budget {self.gpu_gb} exceeded: {gpu} {states}"
        if self.host_gb is None:
            return
        host = self.host_in_use()
        assert sum(host.values()) <= self.host_gb + 1e-9, f"host budget {self.host_gb} exceeded: {host} {states}"
        parked = {n: v.host_gb for n, v in self.coordinator.views().items() if v.state in (S.PARKED, S.PARKING)}
        assert sum(parked.values()) <= self.host_gb + 1e-9, (
            f"host budget {self.host_gb} exceeded by what the coordinator counts: {parked} {states}")

    def _check_services(self) -> None:
        """No state outlasts its operation; in_flight is the leases held."""
        for name, svc in self.services.items():
            kind = {S.STARTING: "start", S.PARKING: "park", S.RESTORING: "park", S.STOPPING: "stop"}.get(svc.state)
            if kind is not None:
                task = svc._tasks.get(kind)
                assert task is not None and not task.done(), f"{name} is {svc.state.value} with no {kind} under way"
            if svc.state in (S.STOPPED, S.FAILED):
                assert not self.fakes[name].live(), f"{name} is {svc.state.value} with its process alive"
            leases = len(self.held(name))
            assert svc.in_flight == leases, f"{name}: in_flight {svc.in_flight}, leases held {leases}"

    def _check_answers(self, states: dict[str, str]) -> None:
        """Leases only on READY services; every waiter within max_wait; only the answers each call may give."""
        for req in self.requests:
            if req.granted_state is not None:
                assert req.granted_state is S.READY, f"a lease on {req.model} while {req.granted_state.value}"
                assert req.granted_alive, f"a lease on {req.model} whose process is gone or parked"
            assert req.task is not None
            if not req.task.done():
                assert self.now - req.arrival < self.settings.max_wait, (
                    f"a request for {req.model} has waited {self.now - req.arrival:g}s (max_wait "
                    f"{self.settings.max_wait:g}s); {states}")
            elif req.task.cancelled():
                assert req.disconnected, f"a request for {req.model} was cancelled, not by its client"
            else:
                exc = req.task.exception()
                assert exc is None or isinstance(exc, Refused), f"a request for {req.model} raised {exc!r}"
                if exc is not None:
                    assert http_error(exc).status == 503, exc  # an OpenAI error envelope: try again later
        for admin in self.admin:
            if not admin.task.done():
                assert admin.kind != "load" or self.now - admin.arrival < self.settings.max_wait, (
                    f"a load of {admin.model} outlasts max_wait")
                continue
            assert not admin.task.cancelled(), f"admin {admin.kind} of {admin.model} was cancelled"
            exc = admin.task.exception()
            assert exc is None or (isinstance(exc, Refused) and admin.kind in ("load", "park")), (
                f"admin {admin.kind} of {admin.model} raised {exc!r}")

    # -- the end -------------------------------------------------------------------------------

    def drain(self, rounds: int = 200) -> None:
        """Release every lease and let every operation succeed (time passing), until every request has its
        answer and every service has settled."""
        for _ in range(rounds):
            for req in self.held():
                self.release(req)
            steps = self.open_steps()
            if steps:
                self.resolve(steps[0])
                continue
            if not self.held() and not self.waiting() and all(a.task.done() for a in self.admin) and all(
                    svc.state in _SETTLED for svc in self.services.values()):
                return
            self.advance(self.settings.max_wait)
        states = {name: svc.state.value for name, svc in self.services.items()}
        raise AssertionError(f"not settled after {rounds} rounds: waiting {self.waiting()}, {states}")

    def shutdown(self) -> None:
        """Stop the idle watch and every service (as ServiceManager.shutdown does), kills succeeding."""
        self.run(lambda: asyncio.ensure_future(self.coordinator.stop_ttl_watch()))
        stops = self.run(lambda: [asyncio.ensure_future(svc.stop("shutdown")) for svc in self.services.values()])
        for _ in range(100):
            steps = self.open_steps()
            if not steps:
                break
            self.resolve(steps[0])
        assert all(s.done() for s in stops), "shutdown did not end"

    def finish_and_check(self) -> None:
        """The end of a run: every waiter answered, every lease given back, everything stopped."""
        self.drain()
        self.check()
        self.shutdown()
        try:
            for name, svc in self.services.items():
                assert svc.in_flight == 0, f"{name}: in_flight {svc.in_flight} after every lease was released"
                assert svc.state in (S.STOPPED, S.FAILED), f"{name} is {svc.state.value} after shutdown"
                assert not self.fakes[name].live(), f"{name}: a process outlived shutdown"
            assert not self.open_steps(), self.open_steps()
            for req in self.requests:
                assert req.task is not None and req.task.done()
            leftover = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            assert not leftover, f"tasks outlived shutdown: {leftover}"
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        """Cancel whatever is left (after a failure) and close the loop."""
        async def cancel_all() -> None:
            for _ in range(10):
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await self.settle()
        try:
            self.loop.run_until_complete(cancel_all())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            if CLOCK.loop is self.loop:
                CLOCK.loop = None

"""Carries out the scheduler's decisions for each request: leases, swaps, TTL, preload.

Everything here runs on one asyncio loop, so a decision and the state change that
acts on it happen with no ``await`` between them (no check-then-act race): ``plan()``
is called and ``start()``/``stop()`` flip the states synchronously. Waiters sleep on a
broadcast event that every state change and every lease release fires; there is no
poll loop on the request path.

What it refuses it raises as ``Refused`` with a ``Reason`` (model_orchestrator/refusals.py);
the HTTP edge (proxy, control app) maps that to a status. The control plane reads state
through ``status()``/``snapshot()``, never through the services themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from core.common.aio import event_within, wait_all
from core.config.schema import ModelSpec, Settings
from core.host.gpu import resolve_process_overhead
from core.host.memory_share import GIB, WHOLE_GPU_UTILIZATION
from core.service_manager import ManagedService, ServiceManager, StartFailed
from core.supervision.service_state import ServiceSnapshot, ServiceState
from model_orchestrator.model_view import Want, park_host_gb, why_not_parkable
from model_orchestrator.placement import Device, utilization_fill, want_for
from model_orchestrator.refusals import Reason, Refused
from model_orchestrator.scheduler import (
    Decision,
    Join,
    ModelView,
    Reject,
    Restore,
    Serve,
    Start,
    Wait,
    can_serve_now,
    idle_action,
    park_room,
    plan,
)

log = logging.getLogger(__name__)

_SAFETY_RECHECK = 1.0  # re-plan at least this often while waiting, should a wake-up ever be missed
_QUEUE_FULL_RETRY_AFTER = 5.0
_WAIT_TIMEOUT_RETRY_AFTER = 10.0


@dataclass
class Ticket:
    """One admission: who asked (request, admin, preload: the swap metrics' reason), and what this
    request's wait set off ("start" or "restore"; None when it joined one or was served at once)."""

    cause: str = "request"
    loaded: str | None = None


@dataclass(frozen=True)
class ModelStatus:
    """One model as ``/status`` shows it: the service's snapshot and its queue."""

    service: ServiceSnapshot
    waiting: int  # requests waiting for it now


class Coordinator:
    def __init__(
        self,
        manager: ServiceManager,
        settings: Settings,
        budget_gb: float | None,
        memory_released: Callable[[float, tuple[int, ...]], Awaitable[None]] | None = None,
        host_budget_gb: float | None = 0.0,
        overhead_gb: float | None = None,
        devices: Sequence[Device] = (),
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.budget_gb = budget_gb  # of one GPU (the first); with ``devices``, each has its own
        self.devices = list(devices)  # the GPUs models are placed on; none: one GPU of budget_gb, or no accounting
        self.host_budget_gb = host_budget_gb  # what parked models may hold (None: unlimited; 0: never park)
        # Each GPU process's own memory beyond its share (settings.gpu_process_overhead_gb; "auto" is
        # resolved in one place, core.host.gpu.resolve_process_overhead)
        self.overhead_gb = (resolve_process_overhead(settings.gpu_process_overhead_gb) if overhead_gb is None
                            else overhead_gb)
        self.on_swap: Callable[[str, str, str], None] | None = None  # (model, action, reason): metrics
        self._memory_released = memory_released
        self._waiters: dict[str, list[float]] = defaultdict(list)
        self._waiting_total = 0
        self._changed = asyncio.Event()
        self._ttl_task: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Future[None]] = set()  # parks under way (see _park_or_stop)
        # Where each model may go depends on its config and the GPUs only: once (and at a reload), not per decision.
        self._wants: dict[str, Want] = {}
        for svc in manager.services.values():
            self.adopt(svc)

    def use_devices(self, devices: Sequence[Device]) -> None:
        """The same GPUs with new readings of what other processes hold (foreign_memory.py): decisions from
        now on place with them, and waiters look again."""
        self.devices = list(devices)
        self.notify()

    # -- change broadcast -------------------------------------------------------------

    def notify(self) -> None:
        """Wake every waiter: a state, a lease or a queue changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        await event_within(self._changed, min(remaining, _SAFETY_RECHECK))

    # -- snapshots --------------------------------------------------------------------

    def view(self, svc: ManagedService) -> ModelView:
        waiters = self._waiters.get(svc.name)
        record, spec = svc.park_record, svc.spec
        would_hold = park_host_gb(spec, record.host_bytes)
        holds = record.host_bytes / GIB if record.host_bytes is not None else 0.0
        if svc.holds_host_copy_maybe:  # at least the estimate; unknown: all of it
            holds = math.inf if would_hold is None else max(holds, would_hold)
        return ModelView(
            name=svc.name, state=svc.state, vram_gb=spec.vram_gb, pinned=spec.pinned,
            in_flight=svc.in_flight, last_used=svc.last_used, max_concurrency=spec.max_concurrency,
            oldest_waiter=min(waiters) if waiters else None, failed_until=svc.failed_until,
            parkable=svc.parker.parkable and record.unsupported is None, host_gb=holds, park_host_gb=would_hold,
            ttl=spec.ttl, park_idle=spec.park.idle, overhead_gb=self._overhead_gb(spec),
            kept_gb=spec.park.vram_kept_gb, devices=svc.placed_on, want=self._wants[svc.name],
            retiring=svc.retiring,
        )

    def _overhead_gb(self, spec: ModelSpec) -> float:
        return 0.0 if spec.vram_gb == 0 else self.overhead_gb

    def views(self) -> dict[str, ModelView]:
        return {name: self.view(svc) for name, svc in self.manager.services.items()}

    def waiting(self, name: str) -> int:
        return len(self._waiters.get(name, ()))

    def snapshot(self, name: str) -> ServiceSnapshot:
        return self.manager[name].snapshot()

    def status(self) -> dict[str, ModelStatus]:
        """Every model, in config order: its snapshot and how many requests wait for it."""
        return {name: ModelStatus(svc.snapshot(), self.waiting(name)) for name, svc in self.manager.services.items()}

    # -- leases -----------------------------------------------------------------------

    def _swapped(self, model: str, action: str, reason: str) -> None:
        if self.on_swap is not None:
            self.on_swap(model, action, reason)

    @contextlib.asynccontextmanager
    async def lease(self, name: str, ticket: Ticket | None = None) -> AsyncIterator[ManagedService]:
        """Hold ``name`` ready for one request; other requests cannot evict it meanwhile."""
        svc = await self.acquire(name, ticket)
        try:
            yield svc
        finally:
            self.release(svc)

    def servable_now(self, name: str) -> bool:
        """Whether ``acquire(name)`` would return at once (its fast path)."""
        return self._servable_now(self.manager[name])

    def _servable_now(self, svc: ManagedService) -> bool:
        """No request waits for any model and ``svc`` has a free slot."""
        return not self._waiting_total and can_serve_now(svc)

    async def acquire(self, name: str, ticket: Ticket | None = None) -> ManagedService:
        """``name`` ready, with a slot taken for one request (``release`` gives it back). ``ticket``
        says who asks, and learns whether this request started or restored the model."""
        svc = self.manager[name]
        if self._servable_now(svc):
            # Fast path, the common case: nobody queued anywhere, so nothing can be closing
            # it (closing needs a waiter) and plan() would say Serve; no snapshot needed.
            svc.begin_request()
            return svc
        if self.waiting(name) >= self.settings.max_queue:
            raise Refused(Reason.QUEUE_FULL, f"Too many requests are waiting for model {name!r} "
                          f"(max_queue {self.settings.max_queue}); retry later.", _QUEUE_FULL_RETRY_AFTER)
        arrival = time.monotonic()
        self._waiters[name].append(arrival)
        self._waiting_total += 1
        try:
            return await self._acquire(svc, arrival, ticket or Ticket())
        finally:
            self._waiters[name].remove(arrival)
            self._waiting_total -= 1
            self.notify()

    async def _acquire(self, svc: ManagedService, arrival: float, ticket: Ticket) -> ManagedService:
        deadline = arrival + self.settings.max_wait
        while True:
            if self.manager.services.get(svc.name) is not svc:
                raise Refused(Reason.REMOVED, f"The model {svc.name!r} was removed from the config (a reload) while "
                              "this request waited for it.")
            decision = self.decide(svc.name, arrival)
            if isinstance(decision, Serve):
                svc.begin_request()
                return svc
            if isinstance(decision, Reject):
                raise Refused(decision.reason, decision.message, decision.retry_after)
            try:
                await self._act(svc, decision, deadline, ticket)
            except asyncio.TimeoutError:
                raise self._timed_out(svc) from None

    def decide(self, name: str, arrival: float | None = None) -> Decision:
        budget = self.devices or self.budget_gb
        return plan(name, self.views(), budget, time.monotonic(), self.settings.batch_window, arrival,
                    self.host_budget_gb)

    async def _act(self, svc: ManagedService, decision: Decision, deadline: float, ticket: Ticket) -> None:
        if isinstance(decision, (Start, Restore)):
            self._begin_swap(svc, decision, ticket)
        elif isinstance(decision, Join):
            await self._join_start(svc, deadline)
        elif isinstance(decision, Wait):
            log.debug("%s: waiting: %s", svc.name, decision.reason)
            await self._wait_for_change(deadline)

    def _begin_swap(self, svc: ManagedService, decision: Start | Restore, ticket: Ticket) -> None:
        """Park or stop the victims, and start or restore ``svc`` once they are out. Synchronous: no await."""
        evict, park = decision.evict, decision.park
        # The parks begin at once (PARKING is visible to the next decision) but send their park calls
        # only once this swap's stops are done: those free the host memory the parks were sized into.
        stopping: list[Awaitable[object]] = [self.manager[v].stop(f"evicted for {svc.name}")
                                             for v in evict if v not in park]
        stops = [*stopping, *(self._park_or_stop(self.manager[v], f"to make room for {svc.name}", stopping)
                              for v in park)]
        need = self._gpu_need(svc)
        if need is not None and self._memory_released is not None:
            # Before every start, not only after an eviction: a model stopped a moment ago (TTL,
            # an operator's unload, a crash) may still be handing its memory back to the driver.
            stops = [self._after(stops, self._memory_released(need, decision.devices))]
        if evict:
            stopped = [v for v in evict if v not in park]
            log.info("swap:%s%s to %s %s", f" parking {', '.join(park)}" if park else "",
                     f" stopping {', '.join(stopped)}" if stopped else "",
                     "restore" if isinstance(decision, Restore) else "load", svc.name)
        for victim in evict:
            self._swapped(victim, "park" if victim in park else "stop", "eviction")
        restoring = isinstance(decision, Restore)
        ticket.loaded = "restore" if restoring else "start"
        self._swapped(svc.name, ticket.loaded, ticket.cause)
        if restoring:
            svc.restore(after=stops)
        else:
            fill = utilization_fill(svc.spec.vram_gb, decision.devices, self.devices, self.budget_gb)
            svc.start(after=stops, devices=decision.devices, fills={"{gpu_memory_utilization}": fill})

    def _gpu_need(self, svc: ManagedService) -> float | None:
        """GiB that must be free on the GPU before ``svc`` starts (None: it uses no GPU, or no budget)."""
        if svc.spec.vram_gb is not None:
            return svc.spec.vram_gb + self._overhead_gb(svc.spec) if svc.spec.vram_gb else None
        # A whole-GPU model: the share its engine takes by default (vLLM: 0.9 of the card).
        return None if self.budget_gb is None else self.budget_gb * WHOLE_GPU_UTILIZATION

    @staticmethod
    async def _after(first: list[Awaitable[object]], then: Awaitable[None]) -> None:
        await asyncio.gather(*first, return_exceptions=True)
        await then

    async def _join_start(self, svc: ManagedService, deadline: float) -> None:
        # Joins the start or restore under way (a failed restore stops the service: then re-plan).
        start = svc.restore() if svc.state is ServiceState.RESTORING else svc.start()
        await asyncio.wait({start}, timeout=max(0.0, deadline - time.monotonic()))
        if not start.done():
            raise asyncio.TimeoutError
        if start.cancelled():
            return  # the start was aborted (an unload or shutdown); re-plan
        exc = start.exception()
        if isinstance(exc, StartFailed):
            raise Refused(Reason.START_FAILED, f"Model {svc.name!r} failed to start: {exc}",
                          retry_after=max(1.0, svc.not_before - time.monotonic()))
        if exc is not None:  # a bug in the start: still an answer in the envelope, never a bare 500
            raise Refused(Reason.START_FAILED, f"Model {svc.name!r} failed to start: {type(exc).__name__}: {exc}",
                          retry_after=1.0)

    def _timed_out(self, svc: ManagedService) -> Refused:
        return Refused(Reason.WAIT_TIMEOUT, f"Timed out after {self.settings.max_wait:g}s waiting for model "
                       f"{svc.name!r} (state: {svc.state.value}); retry later.", _WAIT_TIMEOUT_RETRY_AFTER)

    def release(self, svc: ManagedService) -> None:
        svc.end_request()
        # Wake waiters (this slot, or this model draining) and the idle watch (idle from now: ttl, park.idle).
        if self._waiting_total or svc.retiring or (
                svc.in_flight == 0 and (svc.spec.ttl > 0 or svc.spec.park.idle > 0)):
            self.notify()

    # -- operator actions, preload, TTL -----------------------------------------------

    async def load(self, name: str, cause: str = "admin") -> ManagedService:
        """Make ``name`` ready (resetting a failed state) without serving a request."""
        svc = self.manager[name]
        svc.reset()
        async with self.lease(name, Ticket(cause)):
            return svc

    async def park(self, name: str) -> ManagedService:
        """Park ``name`` now (an operator's action): it must be ready, idle and able to park."""
        svc = self.manager[name]
        if svc.state is ServiceState.PARKED:
            return svc
        views = self.views()
        room = park_room(name, views, self.host_budget_gb)
        if room is None or not views[name].idle or views[name].oldest_waiter is not None:
            why = why_not_parkable(views[name], svc.park_record.unsupported, self.host_budget_gb)
            raise Refused(Reason.NOT_PARKABLE, f"Model {name!r} cannot be parked now: {why}.")
        self._swapped(name, "park", "admin")
        await self._park_or_stop(svc, "parked by operator", self._stop_for_room(room, name))
        return svc

    def _stop_for_room(self, names: tuple[str, ...], parking: str) -> list[Awaitable[object]]:
        """Stop the parked models ``names`` so ``parking`` fits the host budget (``park_room``)."""
        for name in names:
            self._swapped(name, "stop", "host_room")
        return [self.manager[name].stop(f"to make host memory room for {parking}") for name in names]

    def _park_or_stop(self, svc: ManagedService, reason: str, after: Sequence[Awaitable[object]] = ()
                      ) -> asyncio.Future[None]:
        """Begin parking ``svc`` now (synchronously: the scheduler sees it PARKING at once; ``after``
        are awaited before the park calls, e.g. parked models stopped for host room); the awaitable
        never raises and ends when it is parked or, when the park failed or a stop cancelled it, once
        that stop is done (its memory is only free then: the next model must not start beside it)."""
        parking = svc.park(svc.spec.park.level, reason, after)

        async def settled() -> None:
            await wait_all([parking])  # not `await parking`: a stop cancelling the park ends it too
            if svc.state is ServiceState.STOPPING:
                await wait_all([svc.stop()])
        # A task, so it runs whether or not anyone awaits it (the idle timer does not), kept referenced.
        task = asyncio.ensure_future(settled())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def unload(self, name: str, reason: str = "unloaded by operator") -> None:
        if self.manager[name].state.has_process:
            self._swapped(name, "stop", "admin")
        await self.manager[name].stop(reason)

    def reset(self, name: str) -> None:
        """Forget ``name``'s failures: a FAILED model may start again at once."""
        self.manager[name].reset()

    async def preload(self) -> None:
        for name, svc in list(self.manager.services.items()):
            if svc.spec.preload:
                await self.preload_one(name)

    async def preload_one(self, name: str) -> None:
        try:
            await self.load(name, "preload")
        except Refused as exc:
            log.error("preload of %s failed: %s", name, exc.message)

    # -- a reload (model_orchestrator/reload.py) ------------------------------------------

    def use_settings(self, settings: Settings, host_budget_gb: float | None) -> None:
        self.settings, self.host_budget_gb = settings, host_budget_gb

    def adopt(self, svc: ManagedService) -> None:
        """A service a reload added."""
        svc.on_change = self.notify
        self.replace_want(svc.spec)

    def replace_want(self, spec: ModelSpec) -> None:
        self._wants[spec.name] = want_for(spec.gpus, spec.tensor_parallel, spec.placement or
                                          self.settings.gpus.placement, self.devices)

    def forget(self, name: str) -> None:
        """A model a reload removed, now stopped: its waiters find it gone (Reason.REMOVED) and give up."""
        self._wants.pop(name, None)
        self.notify()

    async def until_idle(self, svc: ManagedService) -> None:
        """Until no request of ``svc`` is in flight (``release`` notifies while it is retiring)."""
        while svc.in_flight:
            await event_within(self._changed, _SAFETY_RECHECK)

    def start_ttl_watch(self) -> None:
        self._ttl_task = asyncio.create_task(self._ttl_loop(), name="ttl-watch")

    async def stop_ttl_watch(self) -> None:
        if self._ttl_task is not None:
            self._ttl_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ttl_task

    async def _ttl_loop(self) -> None:
        """Parks (``park.idle``) and stops (``ttl``) idle models when their timers run out."""
        while True:
            now = time.monotonic()
            next_check = now + 3600.0
            views = self.views()
            for name, svc in self.manager.services.items():
                action, at, room = idle_action(name, views, now, self.host_budget_gb)
                if action == "park":
                    self._swapped(name, "park", "idle")
                    self._park_or_stop(svc, f"idle for {svc.spec.park.idle:g}s (park.idle)",
                                       self._stop_for_room(room, name))
                elif action == "stop":
                    self._swapped(name, "stop", "ttl")
                    svc.stop(f"idle for {svc.spec.ttl:g}s (ttl)")
                if action is not None:
                    views = self.views()  # what it holds changed: the next model decides on that
                elif at is not None:
                    next_check = min(next_check, at)
            await event_within(self._changed, max(0.0, next_check - now))


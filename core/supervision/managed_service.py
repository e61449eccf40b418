"""One managed service: its process, its state machine, and the operations that change it
(start, park, restore, stop). Created by ``ServiceManager`` (core/service_manager.py). Mechanism only.

Which service to start or stop, and when, is decided elsewhere (the orchestrator's
scheduler); this module only carries the decisions out, reliably (the process side, spawn,
exit watch and kill, is core/supervision/service_process.py):

* each service is the leader of its own process group, with its own interpreter and
  environment; children die with the orchestrator (parent-death signal + reaper);
* stdout/stderr go to ``<log_dir>/<model>.log`` and an in-memory ring buffer;
* a start waits for the health endpoint (core/supervision/readiness.py), while watching the process and
  the ``startup_time`` deadline; a failure reports the last log lines;
* stop is SIGTERM to the group, ``stop_timeout``, SIGKILL to the group, then a sweep;
* a park keeps the process and gives its GPU memory back; a restore brings it back
  (core/supervision/service_park.py); either failing stops the service;
* crashes are detected, counted by the restart policy, and after repeated failures the
  service is FAILED until its cooldown passes or an operator resets it; so are hangs,
  found by a health watch while READY (core/supervision/health_watch.py) or by the proxy's timeouts.

No stuck states: whatever a start raises ends it (core/supervision/start_errors.py), and a stop wins
over the start it interrupts however that start ends. The stop cancels it; as a cancellation
can be swallowed on its way (core/common/aio.py), the start also checks after its awaits, and right
before READY, that it is still the current start. ``start()`` and ``stop()`` hand out
shielded futures: a waiter giving up never cancels the start or the stop itself.

Request accounting has one owner: ``begin_request()``/``end_request()`` are the only writers
of ``in_flight`` and ``last_used`` (READY also marks it used). ``on_change`` hears every state change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any

import httpx

from core.common.aio import done_future, joined, retrieve_exception, wait_all
from core.common.redact import redact_argv
from core.config.launch import fill_placeholders
from core.config.schema import ModelSpec
from core.supervision.child_env import placed_env
from core.supervision.health_watch import start_health_watch
from core.supervision.log_capture import ServiceLog
from core.supervision.park_client import ParkClient
from core.supervision.readiness import probe, wait_healthy
from core.supervision.reaper import Reaper
from core.supervision.restart_policy import RestartPolicy, decide_restart
from core.supervision.service_park import run_park, run_restore
from core.supervision.service_process import ServiceProcess
from core.supervision.service_state import ParkRecord, ServiceSnapshot, ServiceState, check_transition
from core.supervision.start_errors import StartFailed, start_failure

log = logging.getLogger(__name__)

State = ServiceState


class ManagedService:
    """One model service process and its lifecycle. Create through ``ServiceManager``."""

    def __init__(self, spec: ModelSpec, *, argv: list[str], env: dict[str, str], service_log: ServiceLog,
                 policy: RestartPolicy, health: httpx.AsyncClient, reaper: Reaper | None,
                 service_token: str | None = None, health_interval: float = 0.0, health_failures: int = 3) -> None:
        self.spec = spec
        self.service_token = service_token  # the proxy sends it as the upstream's Authorization
        self.argv = argv
        self._policy = policy
        self._health = health
        self._health_interval = health_interval  # seconds between probes while READY; 0: off
        self._health_failures = health_failures  # failed probes / upstream timeouts in a row = hung
        self.log = service_log
        self._process = ServiceProcess(spec.name, argv, env, service_log, reaper, self._on_exit)
        self.state = State.STOPPED
        self._in_flight = 0
        self._last_used = 0.0  # time.monotonic() a request last began or ended (or READY)
        self.max_concurrency: int | None = spec.max_concurrency  # copied: read per request (can_serve_now)
        # Admits no new request: a reload restarts or removes it once its requests finish (the orchestrator's
        # scheduler reads it; the service's state is unchanged until then).
        self.retiring = False
        self.started_at: float | None = None  # time.time() of the last READY
        self.failures: list[float] = []
        self.not_before = 0.0  # earliest monotonic time of the next start (backoff)
        self.failed_until = 0.0
        self.last_error: str | None = None
        self.upstream_timeouts = 0  # consecutive; see upstream_timed_out()
        self.on_change: Callable[[], None] | None = None  # called after every state change
        self.on_transition: Callable[[str, State, State], None] | None = None  # (name, old, new): metrics
        # The operation under way per kind ("start", "park": a park or a restore, "stop"); see _begin.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping_from: State | None = None  # while STOPPING: the state the stop began in
        self.parker = ParkClient(spec, health, service_token)
        self.park_record = ParkRecord()
        self.devices: tuple[int, ...] = ()  # the GPUs of its last start (kept while parked: it restores there)
        self._fills: dict[str, str] = {}  # placeholders of its last start (core/config/launch.py)
        self._health_watch: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self._process.process

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def restarts(self) -> int:
        return max(0, self._process.spawns - 1)

    # -- request accounting: the only writers of in_flight and last_used -------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def last_used(self) -> float:
        return self._last_used

    def begin_request(self) -> None:
        """A request was admitted to this service (the coordinator's lease)."""
        self._in_flight += 1
        self._last_used = time.monotonic()

    def end_request(self) -> None:
        """A request admitted by ``begin_request`` has ended, however it ended."""
        assert self._in_flight > 0, f"{self.name}: end_request without begin_request"
        self._in_flight -= 1
        self._last_used = time.monotonic()

    @property
    def holds_host_copy_maybe(self) -> bool:
        """Whether its process may hold a park's host copy of unknown size: parking, parked, restoring
        (the copy is read back, and kept), or being stopped from there (it is back only once the process
        is gone)."""
        parked_states = (State.PARKING, State.PARKED, State.RESTORING)
        return self.state in parked_states or (self.state is State.STOPPING and self._stopping_from in parked_states)

    def snapshot(self) -> ServiceSnapshot:
        return ServiceSnapshot(
            spec=self.spec, state=self.state, pid=self.pid, in_flight=self._in_flight, last_used=self._last_used,
            started_at=self.started_at, restarts=self.restarts, failures=len(self.failures),
            last_error=self.last_error, command=tuple(redact_argv(self.argv)), park=self.park_record,
            devices=self.placed_on,
        )

    @property
    def placed_on(self) -> tuple[int, ...]:
        """The GPUs it holds memory on now, or is parked on (where it restores); () when it holds none."""
        return self.devices if self.state.holds_memory or self.state is State.PARKED else ()

    # -- the one place a state changes ----------------------------------------------

    def _transition(self, new: State, reason: str = "") -> None:
        check_transition(self.name, self.state, new)
        old, self.state = self.state, new
        self._stopping_from = old if new is State.STOPPING else None
        if not new.has_process and new is not State.STOPPING:  # its process, and so its host copy, is gone
            self.park_record = replace(self.park_record, level=None, host_bytes=None)
        log.info("%s: %s -> %s%s", self.name, old.value, new.value, f" ({reason})" if reason else "")
        if self.on_transition is not None:
            self.on_transition(self.name, old, new)
        self._watch_health_while_ready()
        if self.on_change is not None:
            self.on_change()

    def _watch_health_while_ready(self) -> None:
        watch, self._health_watch = self._health_watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        if self.state is State.READY:
            self._health_watch = start_health_watch(self, self._health_interval, self._health_failures)

    # -- start ------------------------------------------------------------------------

    def start(self, after: Sequence[Awaitable[object]] = (), devices: tuple[int, ...] = (),
              fills: Mapping[str, str] | None = None) -> asyncio.Future[None]:
        """Begin a start now (STARTING at once) and return a future of its end.

        ``after`` are awaited before spawning (e.g. evicted services stopping); ``devices`` are the
        GPUs it was placed on (none: the inherited mask); ``fills`` the placeholders only a start
        knows ({gpu_memory_utilization}). While a start is under way, calling again joins it. The
        future raises StartFailed, or is cancelled when a stop aborted the start; cancelling it
        only gives up the wait.
        """
        if self.state is State.FAILED:
            self.failures.clear()  # the cooldown is over or an operator asked: a fresh budget
        if self.state is not State.STARTING:  # a new start: placed now, so the next decision sees where
            self.devices = devices
            self._fills = dict(fills or {})
        return self._begin("start", State.STARTING, "", lambda: self._run_start(list(after)))

    def _begin(self, kind: str, state: State, reason: str, work: Callable[[], Coroutine[Any, Any, None]]
               ) -> asyncio.Future[None]:
        """Begin or join: the one way a start, park, restore or stop begins.

        In ``state`` with that operation still running: join it. Else go to ``state`` now
        (synchronously, so every decision made after this call sees it) and run ``work()`` as the
        ``kind`` task. The future is shielded: a waiter giving up never cancels the operation.
        """
        task = self._tasks.get(kind)
        if self.state is state and task is not None and not task.done():
            return joined(task)
        if self.state is not state:
            self._transition(state, reason)
        task = self._tasks[kind] = asyncio.create_task(work(), name=f"{state.value}:{self.name}")
        task.add_done_callback(retrieve_exception)
        return joined(task)

    def _is_current(self, kind: str, *states: State) -> bool:
        """Called from an operation's task: it is still the one under way (no stop or crash took over)."""
        return self.state in states and self._tasks.get(kind) is asyncio.current_task()

    async def _run_start(self, after: list[Awaitable[object]]) -> None:
        try:
            await wait_all(after)
            await self._backoff()
            argv = [fill_placeholders(token, self._fills) for token in self.argv]
            await self._process.spawn(self.spec.host, self.spec.port, placed_env(self.devices), argv)
            await wait_healthy(self.spec, self._process, self.probe, self._check_still_starting)
            self._check_still_starting()
        except asyncio.CancelledError:
            if self._is_current_start():  # not cancelled by a stop (which takes over): clean up
                self.stop("start cancelled")
            raise
        except Exception as exc:
            if not self._is_current_start():  # a stop took over meanwhile and finishes the job
                log.info("%s: start ended during a stop: %s", self.name, exc)
                raise asyncio.CancelledError from exc
            failure = await self._start_failed(exc)
            if failure is exc:
                raise
            raise failure from exc
        self.started_at = time.time()
        self._last_used = time.monotonic()  # idle from now, not since some earlier request (TTL, LRU)
        self.upstream_timeouts = 0  # counts for this process only
        self._transition(State.READY, f"pid {self.pid}")

    def _is_current_start(self) -> bool:
        return self._is_current("start", State.STARTING)

    def _check_still_starting(self) -> None:
        """Raise CancelledError once a stop has taken this start over, should its cancellation
        have been swallowed on the way (asyncio.wait_for before 3.12, an HTTP client's timeouts)."""
        if not self._is_current_start():
            raise asyncio.CancelledError

    async def _backoff(self) -> None:
        delay = self.not_before - time.monotonic()
        if delay > 0:
            log.info("%s: restarting in %.1fs (backoff)", self.name, delay)
            await asyncio.sleep(delay)

    async def _start_failed(self, exc: Exception) -> StartFailed:
        """Clean up after a start that raised ``exc`` and settle the state; return what waiters get."""
        failure, counts = start_failure(exc)
        if not counts:  # no failure on record, no backoff: STOPPED, and the next request tries again
            log.error("%s: start failed: %s", self.name, failure)
            await self._process.kill(self.spec.stop_timeout)
            self._check_still_starting()
            self._transition(State.STOPPED, "orchestrator out of file descriptors")
            return failure
        if failure is not exc:
            log.error("%s: unexpected error during start", self.name, exc_info=exc)
            failure = StartFailed(self._process.with_log_tail(str(failure)))
        await self._fail(str(failure))
        return failure

    async def probe(self, timeout: float = 5.0) -> bool:
        """True if the health endpoint answers 200 within ``timeout`` seconds (core/supervision/readiness.py)."""
        return await probe(self.spec, self._health, timeout)

    # -- exits and failures -------------------------------------------------------------

    async def _on_exit(self, process: asyncio.subprocess.Process, returncode: int | None) -> None:
        """The process exited (its output drained): while READY, parking, parked or restoring that is a
        crash. STOPPING at once (no request is sent to a dead port, no eviction parks it) while what is
        left of the process tree is cleaned up; then STOPPED or FAILED per the restart policy."""
        if self.state.has_process and process is self.process:
            reason = f"crashed: exited with status {returncode}"
            log.error("%s: %s", self.name, reason)
            self.stop(reason, failure=reason)  # not awaited: the stop's kill() waits for this exit watch

    async def _fail(self, reason: str) -> None:
        """Record a failure, clean up what is left of the process, go STOPPED or FAILED."""
        log.error("%s: %s", self.name, reason)
        self.last_error = reason  # before the await: kept even if a stop cuts the clean-up short
        await self._process.kill(self.spec.stop_timeout)
        self._record_failure(reason)

    def _record_failure(self, reason: str) -> None:
        """Count a failure; the restart policy says STOPPED (retry after a backoff) or FAILED."""
        now = time.monotonic()
        self.failures.append(now)
        self.last_error = reason
        decision = decide_restart(self._policy, self.failures, now, self.spec.max_restarts)
        if self.state in (State.STOPPED, State.FAILED):
            return  # already settled by whichever path finished first
        if decision.give_up:
            self.failed_until = decision.not_before
            self._transition(State.FAILED, f"{len(self.failures)} failures; cooling down")
        else:
            self.not_before = decision.not_before
            self._transition(State.STOPPED, "failed")

    # -- park and restore (core/supervision/service_park.py carries them out) ---------------------------

    def park(self, level: int, reason: str, after: Sequence[Awaitable[object]] = ()) -> asyncio.Future[None]:
        """Begin parking a READY service (PARKING at once; ``after`` awaited before its park calls); a
        future of its end, which never raises: a park that fails stops the service instead
        (``park_record`` says why). A stop cancels it."""
        return self._begin("park", State.PARKING, f"level {level}: {reason}",
                           lambda: run_park(self, level, list(after)))

    def restore(self, after: Sequence[Awaitable[object]] = ()) -> asyncio.Future[None]:
        """Begin restoring a PARKED service (RESTORING at once; ``after`` awaited first, as for a
        start), or join the restore under way. Never raises: a restore that fails stops the
        service, so the next start is cold."""
        return self._begin("park", State.RESTORING, "", lambda: run_restore(self, list(after)))

    def park_settled(self, new: State, reason: str) -> bool:
        """Called by the park or restore task: go to ``new`` unless a stop or crash took over."""
        if not self._is_current_park():
            return False
        if new is State.READY:
            self._last_used = time.monotonic()  # idle from now (TTL, LRU)
            self.upstream_timeouts = 0
        self._transition(new, reason)
        return True

    def park_failed(self, reason: str) -> None:
        """Called by the park or restore task: stop the service, unless a stop or crash took over."""
        if self._is_current_park():
            self.stop(reason)

    def _is_current_park(self) -> bool:
        return self._is_current("park", State.PARKING, State.RESTORING)

    # -- stop -------------------------------------------------------------------------------

    def stop(self, reason: str = "requested", *, failure: str | None = None) -> asyncio.Future[None]:
        """Begin a stop (STOPPING at once); return a future of its end. Joins a stop under way.

        With ``failure`` the stop counts as a failure with that reason (a hung service) and
        ends STOPPED or FAILED per the restart policy, as after a crash. Cancelling the
        future only gives up the wait: a stop cut short would leave its process running.
        """
        if self.state in (State.STOPPED, State.FAILED):
            return done_future()
        return self._begin("stop", State.STOPPING, reason, lambda: self._run_stop(failure))

    async def _run_stop(self, failure: str | None) -> None:
        for task in (self._tasks.get("start"), self._tasks.get("park")):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait({task})  # however it ends, this stop finishes the job
        await self._process.kill(self.spec.stop_timeout)
        if self.state is not State.STOPPING:
            return  # a crash noticed meanwhile has settled it
        if failure is None:
            self._transition(State.STOPPED, "stopped")
        else:
            self._record_failure(self._process.with_log_tail(failure))

    # -- hang detection: the health watch (core/supervision/health_watch.py) and the proxy ----------------

    def upstream_timed_out(self) -> None:
        """The proxy's request to this service got no byte within request_timeout.

        ``health_failures`` of them in a row mean it is hung, whatever its health endpoint
        says (a wedged engine behind a live HTTP server).
        """
        self.upstream_timeouts += 1
        if self.upstream_timeouts >= self._health_failures:
            self.hung(f"hung: {self.upstream_timeouts} requests in a row got no answer within "
                      f"request_timeout ({self.spec.request_timeout:g}s)")

    def upstream_answered(self) -> None:
        """The proxy's request to this service got a response (any status)."""
        self.upstream_timeouts = 0

    def hung(self, reason: str) -> None:
        """Kill a READY service that stopped answering, counting it as a failure as a crash is."""
        if self.state is not State.READY:
            return
        log.error("%s: %s; killing it", self.name, reason)
        self.stop(reason, failure=reason)

    # -- a reload (model_orchestrator/reload.py) -------------------------------------------

    def update_spec(self, spec: ModelSpec) -> None:
        """Fields read per request or per decision (aliases, ttl, caps, park settings): from now on."""
        self.spec, self.max_concurrency = spec, spec.max_concurrency
        self.parker.use(spec)

    def relaunch_with(self, spec: ModelSpec, argv: list[str], env: dict[str, str]) -> None:
        """A new command line, environment and spec for its next start; only while it has no process."""
        assert self.state in (State.STOPPED, State.FAILED), f"{self.name}: relaunched while {self.state.value}"
        self.argv = argv
        self._process.launch_with(argv, env)
        self.update_spec(spec)

    def reset(self) -> None:
        """Operator reset: forget failures; a FAILED service may start again at once."""
        self.failures.clear()
        self.not_before = self.failed_until = 0.0
        if self.state is State.FAILED:
            self._transition(State.STOPPED, "reset")

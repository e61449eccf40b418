"""Spawn, health-check, stop and restart the per-model service processes. Mechanism only.

Which service to start or stop, and when, is decided elsewhere (the orchestrator's
scheduler); this module only carries the decisions out, reliably:

* each service is the leader of its own process group, with its own interpreter and
  environment; children die with the orchestrator (parent-death signal + reaper);
* stdout/stderr go to ``<log_dir>/<model>.log`` and an in-memory ring buffer;
* a start waits for the health endpoint, while watching the process and the
  ``startup_time`` deadline; a failure reports the last log lines;
* stop is SIGTERM to the group, ``stop_timeout``, SIGKILL to the group, then a sweep;
* crashes are detected, counted by the restart policy, and after repeated failures the
  service is FAILED until its cooldown passes or an operator resets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx

from core.child_env import new_service_token, service_env
from core.config import ModelSpec, OrchestratorConfig, resolve_python, service_argv
from core.log_capture import ServiceLog
from core.process_tree import leader_exited, port_holder, spawn_group_leader, terminate_tree
from core.reaper import Reaper
from core.restart_policy import RestartPolicy, decide_restart
from core.service_state import ServiceState, check_transition

log = logging.getLogger(__name__)

State = ServiceState
_LOG_TAIL_ON_FAILURE = 20
_PIPE_DRAIN_TIMEOUT = 1.0  # a grandchild may keep the pipe open after the leader exits
# Readiness checks: while the port is closed, a bare TCP connect every _POLL_MIN seconds
# (microseconds of work); once it accepts, HTTP health probes from _POLL_MIN backing off to
# _POLL_MAX, and at once whenever the child prints a line. So detection adds milliseconds,
# not a poll period (llama-swap's 1 s loop adds up to a second per swap).
_POLL_MIN, _POLL_MAX = 0.005, 0.1


class StartFailed(Exception):
    """A start did not reach READY; the message says why and ends with recent log lines."""


class ManagedService:
    """One model service process and its lifecycle. Create through ``ServiceManager``."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        argv: list[str],
        env: dict[str, str],
        log_file: Path | None,
        policy: RestartPolicy,
        health: httpx.AsyncClient,
        reaper: Reaper | None,
        max_log_lines: int,
        service_token: str | None = None,
    ) -> None:
        self.spec = spec
        self.service_token = service_token  # the proxy sends it as the upstream's Authorization
        self.argv = argv
        self._env = env
        self._policy = policy
        self._health = health
        self._reaper = reaper
        self.log = ServiceLog(spec.name, log_file, max_log_lines)
        self.state = State.STOPPED
        self.process: asyncio.subprocess.Process | None = None
        self.in_flight = 0
        self.last_used = 0.0  # time.monotonic() of the last request's end (or start)
        self.started_at: float | None = None  # time.time() of the last READY
        self.starts = 0
        self.failures: list[float] = []
        self.not_before = 0.0  # earliest monotonic time of the next start (backoff)
        self.failed_until = 0.0
        self.last_error: str | None = None
        self.upstream_timeouts = 0  # consecutive; see upstream_timed_out()
        self.listeners: list[Callable[[], None]] = []
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._exit_task: asyncio.Task[int | None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    # -- the one place a state changes ----------------------------------------------

    def _transition(self, new: State, reason: str = "") -> None:
        check_transition(self.name, self.state, new)
        old, self.state = self.state, new
        log.info("%s: %s -> %s%s", self.name, old.value, new.value, f" ({reason})" if reason else "")
        for listener in self.listeners:
            listener()

    # -- start ------------------------------------------------------------------------

    def start(self, after: Sequence[Awaitable[object]] = ()) -> asyncio.Task[None]:
        """Begin a start now (STARTING at once) and return the task that completes it.

        ``after`` are awaited before spawning (e.g. evicted services stopping). While a
        start is under way, calling again joins it. The task raises StartFailed.
        """
        if self.state is State.STARTING and self._start_task is not None:
            return self._start_task
        if self.state is State.FAILED:
            self.failures.clear()  # the cooldown is over or an operator asked: a fresh budget
        self._transition(State.STARTING)
        self._start_task = asyncio.create_task(self._run_start(list(after)), name=f"start:{self.name}")
        self._start_task.add_done_callback(_retrieve_exception)
        return self._start_task

    async def _run_start(self, after: list[Awaitable[object]]) -> None:
        await asyncio.gather(*after, return_exceptions=True)
        delay = self.not_before - time.monotonic()
        if delay > 0:
            log.info("%s: restarting in %.1fs (backoff)", self.name, delay)
            await asyncio.sleep(delay)
        try:
            await self._spawn()
            await self._wait_healthy()
        except StartFailed as exc:
            await self._fail(str(exc))
            raise
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self._transition(State.READY, f"pid {self.pid}")

    async def _spawn(self) -> None:
        holder = port_holder(self.spec.host, self.spec.port)
        if holder is not None:
            raise StartFailed(f"port {self.spec.port} is already in use by {holder}")
        self.starts += 1
        self.log.open(" ".join(self.argv))
        try:
            self.process = await spawn_group_leader(self.argv, self._env)
        except OSError as exc:
            raise StartFailed(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from exc
        if self._reaper is not None:
            self._reaper.register(self.process.pid)
        self._exit_task = asyncio.create_task(self._watch_exit(self.process), name=f"exit:{self.name}")

    async def _wait_healthy(self) -> None:
        """Poll health until 200, the process exits, or startup_time passes."""
        assert self._exit_task is not None
        deadline = time.monotonic() + self.spec.startup_time
        interval = _POLL_MIN
        while True:
            if self._exit_task.done():
                raise StartFailed(self._with_logs(f"exited with status {self._exit_task.result()} during start"))
            if await self._port_accepts():
                if await self.probe(timeout=2.0):
                    return
                interval = min(interval * 1.5, _POLL_MAX)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartFailed(self._with_logs(f"not healthy after {self.spec.startup_time:g}s (startup_time)"))
            self.log.activity.clear()
            activity = asyncio.ensure_future(self.log.activity.wait())
            await asyncio.wait({self._exit_task, activity}, timeout=min(interval, remaining),
                               return_when=asyncio.FIRST_COMPLETED)
            activity.cancel()

    async def _port_accepts(self) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.spec.host, self.spec.port), 1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    async def probe(self, timeout: float = 5.0) -> bool:
        """True if the health endpoint answers 200 within ``timeout`` seconds."""
        url = self.spec.base_url() + self.spec.health_path
        try:
            response = await self._health.get(url, timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # -- exits and failures -------------------------------------------------------------

    async def _watch_exit(self, process: asyncio.subprocess.Process) -> int | None:
        assert process.stdout is not None
        pump = asyncio.create_task(self.log.pump(process.stdout))
        await leader_exited(process)  # not process.wait(): children may hold the pipe open
        returncode = process.returncode
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump), _PIPE_DRAIN_TIMEOUT)
        pump.cancel()
        self.log.write(f"=== exited with status {returncode} ===")
        self.log.close()
        if self.state is State.READY and process is self.process:
            await self._fail(self._with_logs(f"crashed: exited with status {returncode}"))
        return returncode

    async def _fail(self, reason: str) -> None:
        """Record a failure, clean up what is left of the process, go STOPPED or FAILED."""
        log.error("%s: %s", self.name, reason)
        await self._kill_process(self.spec.stop_timeout)
        now = time.monotonic()
        self.failures.append(now)
        self.last_error = reason
        decision = decide_restart(self._policy, self.failures, now, self.spec.max_restarts)
        if decision.give_up:
            self.failed_until = decision.not_before
            self._transition(State.FAILED, f"{len(self.failures)} failures; cooling down")
        else:
            self.not_before = decision.not_before
            self._transition(State.STOPPED, "failed")

    def _with_logs(self, message: str) -> str:
        tail = self.log.tail(_LOG_TAIL_ON_FAILURE)
        return message + ("\nlast log lines:\n" + "\n".join(tail) if tail else "")

    # -- stop -------------------------------------------------------------------------------

    def stop(self, reason: str = "requested") -> asyncio.Task[None]:
        """Begin a stop (STOPPING at once); returns the task. Joins a stop under way."""
        if self.state is State.STOPPING and self._stop_task is not None:
            return self._stop_task
        if self.state in (State.STOPPED, State.FAILED):
            return _done_task()
        self._transition(State.STOPPING, reason)
        self._stop_task = asyncio.create_task(self._run_stop(), name=f"stop:{self.name}")
        return self._stop_task

    async def _run_stop(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartFailed):
                await self._start_task
        await self._kill_process(self.spec.stop_timeout)
        if self.state is State.STOPPING:
            self._transition(State.STOPPED, "stopped")

    async def _kill_process(self, timeout: float) -> None:
        """Terminate the process tree (a no-op wait if the leader already exited) and reap it."""
        process = self.process
        if process is None:
            return

        def escalate() -> None:
            log.warning("%s: still running %gs after SIGTERM; sending SIGKILL", self.name, timeout)

        # With the leader gone this only sweeps what is left of its group.
        await terminate_tree(process, timeout if process.returncode is None else 0, on_escalate=escalate)
        exit_task = self._exit_task
        if exit_task is not None and exit_task is not asyncio.current_task():
            await asyncio.shield(exit_task)
        if self._reaper is not None:
            self._reaper.unregister(process.pid)
        self.process = None

    # -- hang detection (fed by the proxy) --------------------------------------------------

    def upstream_timed_out(self) -> None:
        """The proxy's request to this service got no byte within request_timeout."""
        self.upstream_timeouts += 1

    def upstream_answered(self) -> None:
        """The proxy's request to this service got a response (any status)."""
        self.upstream_timeouts = 0

    def reset(self) -> None:
        """Operator reset: forget failures; a FAILED service may start again at once."""
        self.failures.clear()
        self.not_before = self.failed_until = 0.0
        if self.state is State.FAILED:
            self._transition(State.STOPPED, "reset")


def _retrieve_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # mark as retrieved: failures are reported through state and waiters


def _done_task() -> asyncio.Task[None]:
    async def nothing() -> None:
        return None

    return asyncio.create_task(nothing())


class ServiceManager:
    """Every managed service of one config, the shared health client and the reaper."""

    def __init__(self, config: OrchestratorConfig, *, use_reaper: bool = True) -> None:
        self.config = config
        self._health = httpx.AsyncClient(timeout=5.0, trust_env=False)
        self.reaper = Reaper() if use_reaper else None
        self.service_token = new_service_token()
        settings = config.settings
        policy = RestartPolicy(
            settings.restart_backoff, settings.restart_backoff_max, settings.restart_window,
            settings.failed_cooldown,
        )
        self.services = {
            name: self._build(spec, policy) for name, spec in config.models.items()
        }

    def _build(self, spec: ModelSpec, policy: RestartPolicy) -> ManagedService:
        python = resolve_python(spec.python, self.config.base_dir, sys.executable) or sys.executable
        argv = service_argv(spec, python, self.config.base_dir)
        log_file = self.config.log_dir() / f"{spec.name.replace('/', '_')}.log"
        return ManagedService(
            spec, argv=argv, env=service_env(spec, self.service_token), log_file=log_file, policy=policy,
            health=self._health, reaper=self.reaper, max_log_lines=self.config.settings.log_lines,
            service_token=self.service_token,
        )

    def open(self) -> None:
        """Start the reaper, so services die with us even if we are SIGKILLed."""
        if self.reaper is not None:
            self.reaper.start()

    def __getitem__(self, name: str) -> ManagedService:
        return self.services[name]

    async def shutdown(self) -> None:
        """Stop every service in parallel, then release the reaper and the health client."""
        await asyncio.gather(*(svc.stop("shutdown") for svc in self.services.values()))
        if self.reaper is not None:
            self.reaper.close()
        await self._health.aclose()

"""The OS side of one managed service: spawn it as a group leader, watch it exit, kill its tree.

``ManagedService`` (core/service_manager.py) owns the lifecycle and decides; this owns one
process at a time and carries out spawn and kill. Each process leads its own process group
(so the whole tree can be signalled), is registered with the reaper (so it dies with the
orchestrator), and writes to the service's log. Its exit is watched by a task that drains
the output and then tells the lifecycle through ``on_exit``, which decides whether that
exit was a crash.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping

from core.common.aio import retrieve_exception
from core.common.contract import SERVICE_SOCKET_ENV, remove_socket
from core.common.redact import redact_argv
from core.supervision.log_capture import ServiceLog
from core.supervision.process_tree import leader_exited, port_holder, signal_group, spawn_group_leader, terminate_tree
from core.supervision.reaper import Reaper
from core.supervision.start_errors import StartFailed, os_errors_as

log = logging.getLogger(__name__)

_PIPE_DRAIN_TIMEOUT = 1.0  # a grandchild may keep the pipe open after the leader exits
_LOG_TAIL_ON_FAILURE = 20

Process = asyncio.subprocess.Process
ExitCallback = Callable[[Process, "int | None"], Awaitable[None]]


class ServiceProcess:
    """At most one running process of one service, with its exit watch."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], service_log: ServiceLog,
                 reaper: Reaper | None, on_exit: ExitCallback) -> None:
        self.name = name
        self.argv = argv
        self._env = env
        self.log = service_log
        self._reaper = reaper
        self._on_exit = on_exit
        self.process: Process | None = None
        self.spawns = 0  # processes spawned so far (the port was free)
        self._exit_task: asyncio.Task[int | None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    def launch_with(self, argv: list[str], env: dict[str, str]) -> None:
        """The command line and environment of the next spawn (a reload changed them)."""
        assert self.pid is None, f"{self.name}: relaunched while its process runs"
        self.argv, self._env = argv, env

    async def spawn(self, host: str, port: int, env: Mapping[str, str] | None = None,
                    argv: list[str] | None = None) -> None:
        """Check that ``port`` is free, open the log, spawn the process (its environment plus ``env``:
        this start's own, e.g. the GPUs it was placed on; ``argv``: this start's command line, default
        ``self.argv``) and watch its exit.

        Raises StartFailed (naming whoever holds the port); an OSError becomes one too, except
        the orchestrator's own lack of file descriptors (core/supervision/start_errors.py).
        """
        with os_errors_as(f"cannot check port {port}"):
            holder = port_holder(host, port)
        if holder is not None:
            raise StartFailed(f"port {port} is already in use by {holder}")
        remove_socket(self._env.get(SERVICE_SOCKET_ENV))  # a killed process's file is not this one's socket
        self.spawns += 1
        with os_errors_as(f"cannot open log file {self.log.path}"):
            self.log.open(" ".join(redact_argv(argv or self.argv)))
        with os_errors_as(f"cannot run {self.argv[0]!r}"):
            self.process = await spawn_group_leader(argv or self.argv, {**self._env, **(env or {})})
        if self._reaper is not None:
            self._reaper.register(self.process.pid)
        self._exit_task = asyncio.create_task(self._watch_exit(self.process), name=f"exit:{self.name}")

    def with_log_tail(self, message: str) -> str:
        """``message`` followed by the service's last log lines (what a failure reports)."""
        tail = self.log.tail(_LOG_TAIL_ON_FAILURE)
        return message + ("\nlast log lines:\n" + "\n".join(tail) if tail else "")

    def exited(self) -> bool:
        """Whether the spawned leader has exited and its output is drained."""
        assert self._exit_task is not None, "not spawned"
        return self._exit_task.done()

    def exit_status(self) -> int | None:
        assert self._exit_task is not None and self._exit_task.done(), "still running"
        return self._exit_task.result()

    async def output_or_exit(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds; wake early when the child prints a line or exits."""
        assert self._exit_task is not None, "not spawned"
        self.log.activity.clear()
        activity = asyncio.ensure_future(self.log.activity.wait())
        try:
            await asyncio.wait({self._exit_task, activity}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            activity.cancel()

    async def _watch_exit(self, process: Process) -> int | None:
        assert process.stdout is not None
        pump = asyncio.create_task(self.log.pump(process.stdout))
        pump.add_done_callback(retrieve_exception)
        try:
            await leader_exited(process)  # not process.wait(): children may hold the pipe open
            await asyncio.wait({pump}, timeout=_PIPE_DRAIN_TIMEOUT)  # not wait_for: see core/common/aio.py
        finally:
            pump.cancel()
        returncode = process.returncode
        self.log.write(f"=== exited with status {returncode} ===")
        self.log.close()
        await self._on_exit(process, returncode)  # in this task: kill() waits for what it settles
        return returncode

    async def kill(self, timeout: float) -> None:
        """Terminate the process tree (a no-op wait if the leader already exited) and reap it."""
        process = self.process
        if process is None:
            return

        def escalate() -> None:
            log.warning("%s: still running %gs after SIGTERM; sending SIGKILL", self.name, timeout)

        try:  # with the leader gone this only sweeps what is left of its group
            await terminate_tree(process, timeout if process.returncode is None else 0, on_escalate=escalate)
        except Exception:  # e.g. out of fds while sweeping /proc: a stop must still end
            log.exception("%s: could not stop the process tree in order; killing its group", self.name)
            signal_group(process.pid, signal.SIGKILL)
        exit_task = self._exit_task
        if exit_task is not None and exit_task is not asyncio.current_task():
            await asyncio.wait({exit_task})  # the log is drained, and a crash it saw is settled
        if self._reaper is not None:
            self._reaper.unregister(process.pid)
        if self.process is process:
            self.process = None

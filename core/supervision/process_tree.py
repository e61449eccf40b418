"""Spawning and stopping whole process trees (Linux/POSIX). Mechanism only, no policy.

Model servers fork: vLLM starts engine-core workers, torch starts compile workers.
Killing only the direct child leaves orphans holding GPU memory and ports, so every
service runs as the leader of its own process group. A stop signals the leader first,
so the service can drain its requests and shut its own children down in order (vLLM's
engine core must outlive the requests it serves); whatever is left of the group is then
signalled, and swept with psutil for anything that escaped the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

import psutil

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# errnos meaning this process (EMFILE) or the whole system (ENFILE) has no file descriptor left
OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when the orchestrator dies.

    Runs in the forked child before exec. Covers the direct child only (the setting
    is cleared on fork); grandchildren are covered by the reaper (core/supervision/reaper.py).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died between fork and prctl
            os._exit(1)


async def spawn_group_leader(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None
) -> asyncio.subprocess.Process:
    """Start ``argv`` as leader of a new session/process group, stdout+stderr on one pipe."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user; nothing we can do to it
        log.warning("no permission to signal process group %d", pgid)
        return False
    return True


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes whose process group is ``pgid`` (zombies excluded)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: Sequence[psutil.Process]) -> None:
    """SIGKILL each process still alive and wait briefly for it to go."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    psutil.wait_procs(list(procs), timeout=2)


async def terminate_tree(
    process: asyncio.subprocess.Process,
    timeout: float,
    on_escalate: Callable[[], None] | None = None,
) -> int | None:
    """SIGTERM (+SIGCONT) the leader, wait ``timeout`` s, SIGKILL the group; then end what is left of it.

    Returns the leader's exit status. Children that outlive a leader that exited on its own
    get SIGTERM and a short grace before SIGKILL. Escaped descendants (that left the group
    with setsid) are remembered before the first signal and killed at the end.
    """
    pgid = process.pid
    escaped = [p for p in descendants(pgid) if _pgid_of(p.pid) not in (pgid, None)]
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pgid, signal.SIGTERM)
            # A stopped leader (SIGSTOP, a hung service) acts on SIGTERM only once continued:
            # without this it would always take the SIGKILL path. systemd does the same.
            os.kill(pgid, signal.SIGCONT)
    if not await leader_exited(process, timeout):
        if on_escalate is not None:
            on_escalate()
        signal_group(pgid, signal.SIGKILL)
    await asyncio.to_thread(_end_group, pgid, escaped, min(timeout, _STRAGGLER_GRACE))
    return await process.wait()  # returns once the group is gone and the output pipe has closed


async def leader_exited(process: asyncio.subprocess.Process, timeout: float | None = None) -> bool:
    """Wait until the leader itself has exited; False if ``timeout`` passed first.

    Not ``process.wait()``: on Python < 3.12 that also waits for the output pipe to close,
    which children that inherited it (vLLM's engine core, a stray ``sleep``) keep open after
    the leader is gone. A pidfd becomes readable the moment the process terminates.
    """
    if process.returncode is not None:
        return True
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # exited and reaped in between
        return True
    except OSError as exc:
        if exc.errno not in OUT_OF_FDS:
            raise
        return await _poll_exit(process, timeout)  # we are out of file descriptors: no pidfd, so poll
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        # Not asyncio.wait_for: before Python 3.12 it can swallow the caller's cancellation
        # when the exit lands at the same moment, and a stop must never be swallowed.
        done, _ = await asyncio.wait({exited}, timeout=timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    if not done:
        return False
    # asyncio's child watcher reaps it and sets returncode a moment later (another thread).
    for _ in range(200):
        if _returncode(process) is not None:
            break
        await asyncio.sleep(0.005)
    return True


async def _poll_exit(process: asyncio.subprocess.Process, timeout: float | None) -> bool:
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    while _returncode(process) is None:
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _returncode(process: asyncio.subprocess.Process) -> int | None:
    return process.returncode  # a call, so type checkers do not assume it cannot change across awaits


_STRAGGLER_GRACE = 5.0  # seconds a leftover child gets after SIGTERM, once its leader is gone


def _end_group(pgid: int, escaped: Sequence[psutil.Process], grace: float) -> None:
    """SIGTERM the group's remaining members, wait up to ``grace``, SIGKILL the rest (and the escaped)."""
    members = group_members(pgid)
    if members and signal_group(pgid, signal.SIGTERM):
        signal_group(pgid, signal.SIGCONT)  # stopped members act on SIGTERM only once continued
        _, members = psutil.wait_procs(members, timeout=grace)
    stragglers = [*members, *(p for p in escaped if p.is_running())]
    if stragglers:
        signal_group(pgid, signal.SIGKILL)
        kill_all(stragglers)


def out_of_fds(exc: BaseException) -> OSError | None:
    """The EMFILE/ENFILE error that ``exc`` is, or was raised from; None if it is something else.

    Follows ``__cause__``/``__context__``: an HTTP client wraps the OSError of a failed connect.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in OUT_OF_FDS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def port_holder(host: str, port: int) -> str | None:
    """If ``host:port`` cannot be bound, who holds it ("pid 123 (python)"), else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return None
        else:
            return None
    return _describe_listener(port) or "another process"


async def tcp_connects(host: str, port: int, timeout: float) -> bool:
    """Whether a bare TCP connect to ``host:port`` succeeds within ``timeout`` seconds.

    Raises only if we are out of file descriptors: then the answer says nothing about the
    port. Not ``asyncio.wait_for``, which may swallow the caller's cancellation (core/common/aio.py).
    """
    connect = asyncio.ensure_future(asyncio.open_connection(host, port))
    connect.add_done_callback(_close_connection)
    try:
        done, _ = await asyncio.wait({connect}, timeout=timeout)
    finally:
        connect.cancel()  # a no-op once done
    error = connect.exception() if done else None
    if error is not None and out_of_fds(error):
        raise error
    return bool(done) and error is None


def _close_connection(connect: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    if not connect.cancelled() and connect.exception() is None:
        connect.result()[1].close()


def _describe_listener(port: int) -> str | None:
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in conns:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            try:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
            except psutil.NoSuchProcess:
                continue
    return None

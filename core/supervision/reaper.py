"""A watchdog process that kills every service group if the orchestrator dies, even by SIGKILL.

The kernel's parent-death signal only reaches the direct child of the orchestrator;
a vLLM server's workers would survive it. So the orchestrator starts this tiny
process once, tells it over a pipe which process groups it spawned ("+PGID") or
stopped ("-PGID"), and keeps the pipe open. When the orchestrator exits for any
reason the pipe reaches EOF, and the reaper SIGKILLs every group still registered,
then exits. It runs in its own session and ignores terminal signals, so a Ctrl-C
or SIGTERM aimed at the orchestrator does not take it down first.

Run as ``python -m core.supervision.reaper``; only the standard library is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import IO

from core import repo_pythonpath
from core.supervision.child_env import inherited


def serve(stream: IO[str]) -> set[int]:
    """Track groups from ``stream`` until EOF; return the ones still registered."""
    groups: set[int] = set()
    for raw in stream:
        line = raw.strip()
        if len(line) > 1 and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    return groups


def kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    kill_groups(serve(sys.stdin))


class Reaper:
    """The orchestrator's handle on the reaper process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._stdin: IO[str] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "core.supervision.reaper"],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,
            # The allowlisted environment, as for services: the orchestrator's keys stay in it.
            env={**{k: v for k, v in os.environ.items() if inherited(k)},
                 "PYTHONPATH": repo_pythonpath(os.environ.get("PYTHONPATH"))},
        )
        self._stdin = self._proc.stdin

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        """Close the pipe (the reaper kills what is still registered) and reap it."""
        if self._stdin is not None:
            with contextlib.suppress(OSError):
                self._stdin.close()
            self._stdin = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _send(self, line: str) -> None:
        if self._stdin is None:
            return
        try:
            self._stdin.write(line + "\n")
            self._stdin.flush()
        except OSError:  # the reaper died; services still have their parent-death signal
            self._stdin = None


if __name__ == "__main__":
    main()

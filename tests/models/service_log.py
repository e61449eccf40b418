"""A model service run as a real process, its output followed line by line so tests can wait
on what it logs (a job started, cancelled, finished) instead of on the clock."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from tests.integration.conftest import running_service


class ServiceLog:
    """A service's output, read by a thread as it comes (so the pipe never fills); tests await lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        self._stream = stream
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def close(self) -> None:
        """After the process (and everything it started) has exited: the output is complete."""
        self._reader.join(10)
        self._stream.close()

    def mark(self) -> int:
        """Where the log is now: pass it as ``start`` to await only later lines."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 60) -> re.Match[str]:
        """The first line from ``start`` on that matches ``pattern``, waiting for it to be logged."""
        found = re.search(pattern, self.lines[self.position(pattern, start, timeout)])
        assert found is not None
        return found

    def position(self, pattern: str, start: int = 0, timeout: float = 60) -> int:
        """Index of the first line from ``start`` on that matches ``pattern``, waiting for it to be logged."""
        regex, deadline, index = re.compile(pattern), time.monotonic() + timeout, start
        with self._cond:
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return index
                    index += 1
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    raise AssertionError(f"no log line matching {pattern!r}; log tail:\n{self.tail()}")
                self._cond.wait(left)

    def seen(self, pattern: str, start: int = 0) -> bool:
        with self._cond:
            return any(re.search(pattern, line) for line in self.lines[start:])

    def tail(self, count: int = 60) -> str:
        return "\n".join(self.lines[-count:])


@dataclass
class Service:
    url: str
    log: ServiceLog  # its output, line by line as it comes


@contextmanager
def followed(script: str, *args: str) -> Iterator[Service]:
    """``running_service`` with its output followed line by line (so tests can wait on it)."""
    with running_service(script, *args) as (proc, url):
        assert proc.stdout is not None
        log = ServiceLog(proc.stdout)
        try:
            yield Service(url, log)
        finally:
            proc.kill()
            proc.wait()
            log.close()

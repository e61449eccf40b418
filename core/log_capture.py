"""Capture of a child's stdout/stderr: a log file, an in-memory ring buffer, live followers.

The reader also sets an ``activity`` event on every line. The health-wait uses it to
re-check readiness the moment a server prints "startup complete", instead of waiting
for its next poll tick (so readiness detection adds milliseconds, not up to a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from pathlib import Path
from typing import TextIO

ROTATE_BYTES = 50 * 1024 * 1024  # a log file bigger than this is moved to NAME.log.1 at start
_READ_CHUNK = 64 * 1024
_MAX_LINE = 16 * 1024  # longer lines are cut (progress bars without newlines, binary junk)


class ServiceLog:
    def __init__(self, name: str, path: Path | None, max_lines: int = 2000) -> None:
        self.name = name
        self.path = path
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._followers: set[asyncio.Queue[str]] = set()
        self._file: TextIO | None = None
        self.activity = asyncio.Event()

    def open(self, header: str) -> None:
        """Open (and rotate if large) the log file, writing a header line for this start."""
        self.close()
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > ROTATE_BYTES:
            self.path.replace(self.path.with_suffix(self.path.suffix + ".1"))
        self._file = self.path.open("a", buffering=1)
        self.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} ===")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def write(self, line: str) -> None:
        line = line[:_MAX_LINE]
        self._lines.append(line)
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk must not stop the service
                self._file.write(line + "\n")
        for queue in self._followers:
            if queue.qsize() < 10_000:  # a stalled follower loses lines, never blocks the child
                queue.put_nowait(line)
        self.activity.set()

    def tail(self, n: int | None = None) -> list[str]:
        lines = list(self._lines)
        return lines if n is None else lines[-n:] if n > 0 else []

    def follow(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str]) -> None:
        self._followers.discard(queue)

    async def pump(self, stream: asyncio.StreamReader) -> None:
        """Copy ``stream`` line by line into the log until EOF."""
        pending = b""
        while chunk := await stream.read(_READ_CHUNK):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self.write(raw.decode(errors="replace").rstrip("\r"))
            if len(pending) > _MAX_LINE:
                self.write(pending.decode(errors="replace"))
                pending = b""
        if pending:
            self.write(pending.decode(errors="replace"))

"""Capture of a child's stdout/stderr: a log file, an in-memory ring buffer, live followers.

The reader also sets an ``activity`` event on every line. The health-wait uses it to
re-check readiness the moment a server prints "startup complete", instead of waiting
for its next poll tick (so readiness detection adds milliseconds, not up to a second).

Everything is bounded, whatever a child prints and however slowly a client reads:

* the log file is private (mode 0600: a child may print a token or a prompt) and is
  rotated while the child runs: past ``max_bytes`` it becomes NAME.log.1 (NAME.log.1
  becomes NAME.log.2, ..., up to ``backups`` files) and a fresh NAME.log goes on;
* at most ``max_followers`` live followers (``/logs?follow``); each one's queue holds at
  most ``follower_chars`` of text. A follower that falls behind loses lines, never
  blocks the child or grows memory, and is told how many with one marker line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

from core.common.redact import redact_text

MAX_BYTES = 50 * 1024 * 1024  # a log file is rotated when it would grow past this
BACKUPS = 3
MAX_FOLLOWERS = 8
FOLLOWER_CHARS = 1024 * 1024  # pending text per follower (1 MiB of ASCII)
_READ_CHUNK = 64 * 1024
_MAX_LINE = 16 * 1024  # longer lines are cut (progress bars without newlines, binary junk)


class TooManyFollowers(RuntimeError):
    """``follow()`` past ``max_followers``: answer the client 429/503 instead of streaming."""


class Follower(asyncio.Queue[str]):
    """A follower's queue, bounded by the text it holds rather than by lines.

    Past ``max_chars`` new lines are dropped until the reader has drained half of it (so
    a reader that stays slow gets a marker per half-queue, not one per line). The marker
    "[... N lines dropped: reader too slow ...]" takes the place of the missing lines:
    before the next line accepted, or as soon as the reader has caught up.
    """

    def __init__(self, max_chars: int = FOLLOWER_CHARS) -> None:
        super().__init__()
        self.max_chars = max_chars
        self.pending_chars = 0
        self.dropped = 0

    def offer(self, line: str) -> None:
        """Queue ``line`` if there is room; never blocks, never raises."""
        limit = self.max_chars // 2 if self.dropped else self.max_chars
        if self.pending_chars and self.pending_chars + len(line) + 1 > limit:  # an empty queue takes any line
            self.dropped += 1
            return
        self._flush_marker()
        self.put_nowait(line)

    def _flush_marker(self) -> None:
        if self.dropped:
            count, self.dropped = self.dropped, 0
            self.put_nowait(f"[... {count} lines dropped: reader too slow ...]")

    def _put(self, item: str) -> None:
        super()._put(item)
        self.pending_chars += len(item) + 1

    def _get(self) -> str:
        item = super()._get()
        self.pending_chars -= len(item) + 1
        if self.empty():  # caught up: say what was lost now, not only when the child prints again
            self._flush_marker()
        return item


class ServiceLog:
    def __init__(self, name: str, path: Path | None, max_lines: int = 2000, *, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS, max_followers: int = MAX_FOLLOWERS,
                 follower_chars: int = FOLLOWER_CHARS) -> None:
        self.name = name
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_followers = max_followers
        self.follower_chars = follower_chars
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._followers: set[Follower] = set()
        self._file: BinaryIO | None = None
        self._size = 0  # bytes in the current file: rotation needs no stat() per line
        self.activity = asyncio.Event()

    def open(self, header: str) -> None:
        """Open (and rotate if large) the log file, writing a header line for this start
        (usually the command line: secrets in it are masked, see core/common/redact.py)."""
        self.close()
        if self.path is None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # mode: only a folder we create
        if self.path.exists() and self.path.stat().st_size > self.max_bytes:
            self._rotate()
        self._reopen()
        self.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {redact_text(header)} ===")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def write(self, line: str) -> None:
        line = line[:_MAX_LINE]
        self._lines.append(line)
        if self._file is not None:
            self._write_file((line + "\n").encode(errors="replace"))
        for follower in self._followers:
            follower.offer(line)  # a stalled follower loses lines, never blocks the child
        self.activity.set()

    def tail(self, n: int | None = None) -> list[str]:
        lines = list(self._lines)
        return lines if n is None else lines[-n:] if n > 0 else []

    def follow(self) -> Follower:
        """A queue that receives every new line until ``unfollow``; raises TooManyFollowers."""
        if len(self._followers) >= self.max_followers:
            raise TooManyFollowers(f"{self.name}: already {len(self._followers)} log followers (the limit)")
        follower = Follower(self.follower_chars)
        self._followers.add(follower)
        return follower

    def unfollow(self, queue: asyncio.Queue[str]) -> None:
        if isinstance(queue, Follower):
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

    # -- the file ------------------------------------------------------------------------

    def _write_file(self, data: bytes) -> None:
        assert self._file is not None
        try:  # a full disk or a vanished folder must not stop the service
            if self._size and self._size + len(data) > self.max_bytes:
                self._file.close()
                self._rotate()
                self._reopen()
            self._file.write(data)
            self._size += len(data)
        except OSError:
            if self._file.closed:
                self._file = None

    def _reopen(self) -> None:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a file from before (or made by someone else's umask) too
            self._size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        self._file = open(fd, "ab", buffering=0)  # noqa: SIM115  # closed by close(); unbuffered: one write per line

    def _rotate(self) -> None:
        """NAME.log -> NAME.log.1 -> ... -> NAME.log.<backups>; the oldest is overwritten."""
        assert self.path is not None
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self._backup(index)
            if older.exists():
                older.replace(self._backup(index + 1))
        self.path.replace(self._backup(1))

    def _backup(self, index: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.name}.{index}")

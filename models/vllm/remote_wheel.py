"""Read a few files of a wheel on the package index without downloading it.

A vLLM wheel is about 500 MB, but checking what a release offers needs only a few dozen of its
Python files. pip's resolver names the wheel (``wheel_url``: the configured index, PEP 658
metadata, no download); ``RangeFile`` then reads it through HTTP range requests, so ``zipfile``
fetches the central directory and the members it opens (about 1 MB for vLLM). zipfile checks
each member's CRC, so a damaged read fails rather than passing. Standard library and pip only.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

BLOCK = 256 * 1024  # bytes a range request fetches at least (zipfile reads in small pieces)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over an HTTP(S) URL whose server answers range requests."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        super().__init__()
        self._url, self._timeout, self._pos = url, timeout, 0
        self._blocks: dict[int, bytes] = {}
        head = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(head, timeout=timeout) as reply:
            self._size = int(reply.headers["Content-Length"])
            if reply.headers.get("Accept-Ranges", "").lower() != "bytes":
                raise OSError(f"{url}: the server does not answer range requests")
        self.fetched = 0  # bytes transferred, for the caller's progress line

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        end = min(self._pos + len(buffer), self._size)
        data = b"".join(self._block(index)[max(self._pos - index * BLOCK, 0):end - index * BLOCK]
                        for index in range(self._pos // BLOCK, (end - 1) // BLOCK + 1)) if end > self._pos else b""
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            first = index * BLOCK
            last = min(first + BLOCK, self._size) - 1
            request = urllib.request.Request(self._url, headers={"Range": f"bytes={first}-{last}"})
            with urllib.request.urlopen(request, timeout=self._timeout) as reply:
                if reply.status != 206:
                    raise OSError(f"{self._url}: asked for bytes {first}-{last}, got HTTP {reply.status}")
                self._blocks[index] = reply.read()
            self.fetched += len(self._blocks[index])
        return self._blocks[index]


def wheel_url(requirement: str, python_version: str = "3.12", platform: str = "manylinux_2_31_x86_64") -> str:
    """The URL of the wheel pip would install for ``requirement`` on that Python and platform."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--no-deps",
                        "--ignore-installed", "--only-binary=:all:", "--python-version", python_version,
                        "--platform", platform, "--target", str(Path(scratch) / "target"),
                        "--report", str(report), requirement], check=True, timeout=300)
        chosen = json.loads(report.read_text())["install"]
        return str(chosen[0]["download_info"]["url"])

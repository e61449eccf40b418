"""HTTP/1.1 over a bare socket, for tests that need what HTTP clients will not do:
half-sent headers, stalled bodies, no default headers, and seeing the connection close."""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    closed: bool  # the server closed the connection after this response

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
            timeout: float = 10.0) -> Response:
    """One request with exactly ``headers`` (plus Host and, with a body, Content-Length)."""
    with connect(port, timeout) as sock:
        sock.sendall(head(method, path, headers, len(body) if body else None) + body)
        return read_response(sock)


def head(method: str, path: str, headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: socket.socket) -> Response:
    """One response; ``closed`` is False if anything (a stray second answer) follows it."""
    reader = _Reader(sock)
    status_line = reader.readline()
    headers: dict[str, str] = {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(reader.readline().split(b";")[0], 16):
            body += reader.read(size)
            reader.readline()
        reader.readline()
    elif "content-length" in headers or headers.get("connection") != "close":
        body = reader.read(int(headers.get("content-length", "0")))
    else:  # delimited by the end of the connection
        body = reader.read_to_end()
    closed = not reader.buffer and closed_by_peer(sock)
    return Response(int(status_line.split()[1]), headers, body, closed)


class _Reader:
    """Buffered reads that keep what arrives after the response visible (unlike makefile())."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed without a (complete) answer")
        self.buffer += data

    def readline(self) -> bytes:
        while b"\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_to_end(self) -> bytes:
        with contextlib.suppress(ConnectionError):
            while True:
                self._fill()
        data, self.buffer = self.buffer, b""
        return data

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def closed_by_peer(sock: socket.socket, wait: float = 0.5) -> bool:
    """True if the server has closed (or reset) the connection within ``wait`` seconds."""
    previous = sock.gettimeout()
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    finally:
        sock.settimeout(previous)

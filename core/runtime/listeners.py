"""Where a service listens: its port, and a unix socket too when the orchestrator names one.

The nginx data plane reaches a ready pinned model's service over a unix socket in its private folder
(``AIO_SERVICE_SOCKET``): a request and each streamed event then cost the kernel a local copy instead of a
trip through loopback TCP (bench/RESULTS.md measures both). The port stays: health probes, readiness and the
orchestrator's own proxy use it. The socket answers exactly as the port does (the same app, service token
and all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from core.common.contract import remove_socket

log = logging.getLogger("uvicorn.error")


def listening_sockets(host: str, port: int, unix_path: str | None) -> list[socket.socket] | None:
    """None when there is no unix socket (uvicorn binds host:port itself, as it always has); else sockets bound
    to host:port, as uvicorn would bind them, and to ``unix_path`` (mode 0600; a file left by an earlier run is
    replaced). uvicorn listens on them once its startup is done, so none accepts a connection before."""
    if not unix_path:
        return None
    sockets: list[socket.socket] = []
    try:
        sockets += port_sockets(host, port)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets.append(unix)
        remove_socket(unix_path)
        unix.bind(unix_path)
        os.chmod(unix_path, 0o600)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        log.error("cannot listen on %s:%s and %s: %s", host, port, unix_path, exc)
        raise SystemExit(1) from None
    return sockets


def port_sockets(host: str, port: int) -> list[socket.socket]:
    """A bound socket per address ``host`` resolves to (``localhost``: 127.0.0.1 and ::1), as asyncio's
    create_server binds them; not inherited by child processes."""
    bound: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE):
        if (family, address) in seen:
            continue
        seen.add((family, address))
        sock = socket.socket(family, kind, proto)
        bound.append(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError:
            for opened in bound:
                with contextlib.suppress(OSError):
                    opened.close()
            raise
    return bound

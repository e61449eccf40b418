"""Where a service listens: its port, and a unix socket too when the orchestrator names one.

The nginx data plane reaches a ready pinned model's service over a unix socket in its private folder
(``AIO_SERVICE_SOCKET``): a request and each streamed event then cost the kernel a local copy instead of a
trip through loopback TCP (bench/RESULTS.md measures both). The port stays: health probes, readiness and the
orchestrator's own proxy use it. The socket answers exactly as the port does (the same app, service token
and all).
"""

from __future__ import annotations

import contextlib
import os
import socket

import uvicorn


def listening_sockets(config: uvicorn.Config, unix_path: str | None) -> list[socket.socket] | None:
    """None when there is no unix socket (uvicorn binds host:port itself, as it always has); else the bound
    TCP socket for host:port and a unix socket at ``unix_path`` (mode 0600; a file left by an earlier run of
    this service is replaced)."""
    if not unix_path:
        return None
    tcp = config.bind_socket()
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        remove_socket(unix_path)
        unix.bind(unix_path)
        os.chmod(unix_path, 0o600)
        unix.listen(config.backlog)
    except OSError:
        unix.close()
        tcp.close()
        raise
    return [tcp, unix]


def remove_socket(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

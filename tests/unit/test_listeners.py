"""Where a service listens (core/runtime/listeners.py): its port, and the unix socket the orchestrator names."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import uvicorn

from core.runtime.listeners import listening_sockets, remove_socket


async def _app(scope: object, receive: object, send: object) -> None:  # never called: nothing connects
    raise AssertionError


def test_without_a_socket_uvicorn_binds_the_port_itself() -> None:
    assert listening_sockets(uvicorn.Config(_app, host="127.0.0.1", port=0), None) is None


def test_a_socket_left_by_an_earlier_run_is_replaced_and_only_its_owner_may_connect(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    path.write_text("left behind")
    sockets = listening_sockets(uvicorn.Config(_app, host="127.0.0.1", port=0), str(path))
    assert sockets is not None
    try:
        tcp, unix = sockets
        assert tcp.family == socket.AF_INET and tcp.getsockname()[1] > 0
        assert unix.family == socket.AF_UNIX and stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # it listens
    finally:
        for sock in sockets:
            sock.close()
    remove_socket(str(path))
    remove_socket(str(path))  # gone already: no error
    assert not path.exists()

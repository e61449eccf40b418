"""Where a service listens (core/runtime/listeners.py): its port, and the unix socket the orchestrator names."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from core.common.contract import remove_socket
from core.runtime.listeners import listening_sockets, port_sockets


def test_without_a_socket_uvicorn_binds_the_port_itself() -> None:
    assert listening_sockets("127.0.0.1", 0, None) is None


def test_a_socket_left_by_an_earlier_run_is_replaced_and_only_its_owner_may_use_it(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    path.write_text("left behind")
    sockets = listening_sockets("127.0.0.1", 0, str(path))
    assert sockets is not None
    try:
        tcp, unix = sockets
        assert tcp.family == socket.AF_INET and tcp.getsockname()[1] > 0 and not tcp.get_inheritable()
        assert unix.family == socket.AF_UNIX and stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
            client.connect(str(path))  # bound, not listening: uvicorn listens once its startup is done
    finally:
        for sock in sockets:
            sock.close()
    remove_socket(str(path))
    remove_socket(str(path))  # gone already: no error
    assert not path.exists()


def test_a_name_binds_every_address_it_resolves_to() -> None:
    sockets = port_sockets("localhost", 0)
    try:
        families = {sock.family for sock in sockets}
        assert socket.AF_INET in families  # and AF_INET6 too where localhost names ::1
        assert len(families) == len(sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_ends_the_service_with_its_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(SystemExit) as ended:
            listening_sockets("127.0.0.1", holder.getsockname()[1], str(tmp_path / "svc.sock"))
    assert ended.value.code == 1 and "cannot listen on 127.0.0.1" in caplog.text

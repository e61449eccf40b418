"""Pieces shared by the benchmarks: ports, CPU pinning, the orchestrator, nginx."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
BACKEND = REPO / "bench" / "fake_backend.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cores() -> tuple[set[int], set[int]]:
    """(server cores, load-generator cores): one each when there are two or more."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[0]}, {available[1]}


def pin(core_set: set[int]) -> None:
    os.sched_setaffinity(0, core_set)


def spawn_pinned(argv: list[str], core_set: set[int], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``argv`` on ``core_set`` (children inherit it): taskset when present, else pin after spawn."""
    taskset = shutil.which("taskset")
    prefix = [taskset, "-c", ",".join(map(str, sorted(core_set)))] if taskset else []
    process: subprocess.Popen[bytes] = subprocess.Popen([*prefix, *argv], **kwargs)  # type: ignore[call-overload]
    if not taskset:
        os.sched_setaffinity(process.pid, core_set)
    return process


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def backend_command(port_placeholder: str = "{port}", startup_delay: float = 0.0) -> list[str]:
    return [sys.executable, str(BACKEND), "--host", "{host}", "--port", port_placeholder,
            "--startup-delay", str(startup_delay)]


def _env_for(repo: Path, workdir: Path) -> dict[str, str] | None:
    """The environment that makes ``repo``'s packages win over this checkout's installed ones."""
    if repo.resolve() == REPO:
        return None
    shim = workdir / "baseline-path"
    shim.mkdir(exist_ok=True)
    link = shim / "model_orchestrator"
    if not link.exists():
        link.symlink_to(repo.resolve() / "model-orchestrator")
    return {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{repo.resolve()}"}


@dataclass
class Orchestrator:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def status(self) -> dict[str, dict[str, object]]:
        return dict(httpx.get(self.url + "/status", timeout=10).json()["models"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orchestrator(workdir: Path, models: Mapping[str, object], server_cores: set[int],
                       repo: Path = REPO, **settings: object) -> Orchestrator:
    """An orchestrator serving ``models``; ``repo`` another checkout's (a baseline to compare with)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"settings": {"port": port, "log_dir": str(workdir / "logs"), "base_dir": str(REPO), **settings},
              "models": models}
    path = workdir / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / "orchestrator.log"
    argv = [sys.executable, str(repo / "model-orchestrator" / "orchestrator.py"), "--config", str(path),
            "--log-level", "warning"]
    with log.open("wb") as out:
        process = spawn_pinned(argv, server_cores, stdout=out, stderr=subprocess.STDOUT, env=_env_for(repo, workdir))
    orch = Orchestrator(process, f"http://127.0.0.1:{port}", log)
    wait_http(orch.url + "/health", 30, process)
    return orch


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int

    def pids(self) -> list[int]:
        proc = psutil.Process(self.process.pid)
        return [self.process.pid] + [c.pid for c in proc.children(recursive=True)]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# What every benchmark nginx shares (this one and bench/dataplane_probe.py's): one worker in the
# foreground, no access log, its temporary files under its own prefix. Ends inside the http block.
NGINX_COMMON = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
"""
NGINX_CONF = NGINX_COMMON + """
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, backend_port: int, server_cores: set[int]) -> Nginx | None:
    """nginx in front of the backend (the setup people put in front of vLLM), if installed."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        return None
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, backend=backend_port, port=port))
    process = spawn_pinned([binary, "-c", str(conf), "-p", str(prefix)], server_cores,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx = Nginx(process, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 10, process)
    except (RuntimeError, TimeoutError):
        nginx.stop()
        return None
    return nginx

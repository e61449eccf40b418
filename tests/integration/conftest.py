"""Fixtures for integration tests: real processes, real sockets, free ports, leak checks."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from core.supervision.process_tree import group_members, kill_all, signal_group

REPO = Path(__file__).resolve().parents[2]
FAKE = "tests/fakes/fake_service.py"
ORCHESTRATOR = REPO / "model-orchestrator" / "orchestrator.py"


_PORTS = random.SystemRandom()  # not the global generator: hypothesis seeds that one, and every run would collide


def _worker_ports() -> range:
    """This test process's share of 20000-32000: each pytest-xdist worker draws from its own part, so two
    workers never hand out one port (a service's port is bound only when its model starts, maybe much later,
    and a leak check that matched the other worker's service by its port would kill it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    span = (32000 - 20000) // count
    return range(20000 + index * span, 20000 + (index + 1) * span)


_HANDED_OUT: set[int] = set()  # never the same port twice in one process (two models of one config)


def free_port() -> int:
    """A port free now, for a service bound later. Below Linux's ephemeral range (32768-60999): a port the
    kernel picks (bind to 0) is one it may also give an outgoing connection as its local port before the
    service binds it, and the service then fails to start ("port ... is already in use by pid ...")."""
    ports = _worker_ports()
    if len(_HANDED_OUT) > len(ports) // 2:  # long-finished tests' ports come back
        _HANDED_OUT.clear()
    for _ in range(200):
        port = _PORTS.choice(ports)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def fake_model(name: str, *extra: str, **spec: Any) -> dict[str, Any]:
    """A models.yaml entry running the fake service with the given knobs."""
    return {"type": "text", "service_script": FAKE, "args": ["--served-name", name, *extra],
            "port": free_port(), "startup_time": 20, "stop_timeout": 5, **spec}


def fake_driver(tmp_path: Path, *cards: dict[str, Any]) -> dict[str, str]:
    """The environment that makes an orchestrator (and, with ``env_passthrough: [AIO_FAKE_NVML]``, its
    children) see ``cards`` through the stand-in NVML (tests/fakes/nvml: a mock of the driver, which
    cannot run here), with an admin key."""
    devices = [{"uuid": f"GPU-{i:02d}{'ab' * 6}", "pci_bus_id": f"00000000:{0x41 + i:02x}:00.0", **card}
               for i, card in enumerate(cards)]
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps({"devices": devices, "used": str(tmp_path / "nvml-used.json")}))
    path = os.pathsep.join([str(REPO / "tests" / "fakes" / "nvml"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"AIO_FAKE_NVML": str(spec), "PYTHONPATH": path, "AIO_ADMIN_KEYS": "admin-key-gpus"}


def write_config(directory: Path, models: dict[str, Any], **settings: Any) -> Path:
    config = {
        "settings": {"port": free_port(), "log_dir": str(directory / "logs"), "base_dir": str(REPO),
                     "restart_backoff": 0.2, **settings},
        "models": models,
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def running_service(script: str, *args: str, ready_timeout: float = 120.0, wait_ready: bool = True,
                    python: str = sys.executable) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``python <script> --port <free port> *args`` from the repository; yield (process, base URL).

    Waits until /health answers 200 (unless ``wait_ready`` is False: then until it answers at
    all, or the process exits). The service leads its own process group, like under the
    service manager, and the whole group is stopped afterwards (stop_service_group): vLLM's
    engine core and workers go with it. Its output is on proc.stdout.
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([python, str(REPO / script), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answered() -> bool:
        status = health_status(url)
        return (status == 200 if wait_ready else status is not None) or proc.poll() is not None

    try:
        if not wait_until(answered, ready_timeout):
            raise AssertionError(f"{script} did not become ready within {ready_timeout}s")
        if wait_ready and proc.poll() is not None:
            assert proc.stdout is not None
            raise AssertionError(f"{script} exited with {proc.returncode}:\n{proc.stdout.read().decode()[-3000:]}")
        yield proc, url
    finally:
        stop_service_group(proc)
        assert proc.stdout is not None
        proc.stdout.close()


def stop_service_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a service started with ``start_new_session=True`` as the service manager does.

    SIGTERM (and SIGCONT, for a stopped one) to the service first, so it shuts its own children
    down in order; SIGKILL to its group after ``grace`` s; then SIGTERM to what is left of the
    group, and SIGKILL once ``grace`` s more have passed.
    """
    pgid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            proc.wait()
    members = group_members(pgid)
    if members and signal_group(pgid, signal.SIGTERM):
        signal_group(pgid, signal.SIGCONT)
        _, members = psutil.wait_procs(members, timeout=grace)
    signal_group(pgid, signal.SIGKILL)
    kill_all(members)


def health_status(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def processes_with(marker: str) -> list[psutil.Process]:
    """Live processes whose command line contains ``marker`` (e.g. a unique port)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class Orchestrator:
    """A real orchestrator process on a free port."""

    config: Path
    process: subprocess.Popen[bytes]
    url: str
    models: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    admin_key: str | None = None  # the first of AIO_ADMIN_KEYS when the test gave it some

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/status", headers=self.admin_headers, timeout=10).json()["models"])

    def state(self, model: str) -> str:
        return str(self.status()[model]["state"])

    def chat(self, model: str, content: str = "hello", **body: Any) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": content}], **body}
        return httpx.post(self.url + "/v1/chat/completions", json=payload, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""


def start_orchestrator(config: Path, log_path: Path, env: dict[str, str] | None = None) -> Orchestrator:
    settings = yaml.safe_load(config.read_text())
    host = settings["settings"].get("host", "127.0.0.1")
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{settings['settings']['port']}"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(ORCHESTRATOR), "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    admin_keys = (env or {}).get("AIO_ADMIN_KEYS", "").split(",")
    orch = Orchestrator(config, process, url, settings["models"], log_path, admin_keys[0] or None)

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None
    assert wait_until(healthy, 20), f"orchestrator did not come up:\n{orch.log()}"
    assert process.poll() is None, f"orchestrator exited:\n{orch.log()}"
    return orch


def stop_orchestrator(orch: Orchestrator) -> None:
    if orch.process.poll() is None:
        orch.process.send_signal(signal.SIGTERM)
        try:
            orch.process.wait(30)
        except subprocess.TimeoutExpired:
            orch.process.kill()
            orch.process.wait()


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[Callable[..., Orchestrator]]:
    """Factory: orchestrator(models, **settings) → a running Orchestrator; stopped and leak-checked after."""
    started: list[Orchestrator] = []

    def factory(models: dict[str, Any], env: dict[str, str] | None = None, **settings: Any) -> Orchestrator:
        config = write_config(tmp_path, models, **settings)
        orch = start_orchestrator(config, tmp_path / f"orchestrator-{len(started)}.log", env)
        started.append(orch)
        return orch

    yield factory
    for orch in started:
        stop_orchestrator(orch)
        ports = [str(m["port"]) for m in orch.models.values()]
        leaked = [p for port in ports for p in processes_with(f"--port {port}")]
        for proc in leaked:
            proc.kill()
        assert not leaked, f"service processes left behind: {leaked}"

"""Gateway overhead: the same requests sent to a pod's orchestrator directly and through the gateway.

One pod: an orchestrator on 127.0.0.2 (keys set, as deployed) serving one fake text model
(tests/fakes/fake_service.py; ``--stream-chunks N --token-delay 0``: N tokens as fast as it can).
In front of it the gateway, as scripts/start-gateway.sh runs it: the LiteLLM proxy (its own
environment, .venv-gateway) with the affinity plug-in and our client-key auth, on 127.0.0.1, from
a fleet file naming that one pod: there is no pod to choose, but the plug-in, the auth hook,
LiteLLM's request handling and its second HTTP hop all run. The servers (orchestrator, model service,
gateway) are pinned to one core and the load generator (bench/loadgen.py) to another, as in
proxy_bench.py; each scenario runs on both paths in turn, round after round (the order alternating),
so machine noise hits both alike. CPU is each process's own (psutil cpu_times) over a run, divided
by the requests or SSE events of that run.

    .venv/bin/python -m bench.run --gateway                            # ~1 minute
    .venv/bin/python -m bench.run --gateway --rounds 5 --duration 3
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench import loadgen
from bench.common import REPO, cores, cpu_seconds, pin
from bench.proxy_bench import _percentile
from tests.integration.conftest import (
    Orchestrator,
    fake_model,
    free_port,
    processes_with,
    start_orchestrator,
    stop_orchestrator,
    write_config,
)

GATEWAY_VENV = Path(os.environ.get("AIO_GATEWAY_VENV", REPO / ".venv-gateway"))
MODEL = "bench"
POD_HOST = "127.0.0.2"
CLIENT, ADMIN, MASTER, USER = "pod-client-key", "pod-admin-key", "sk-gateway-master", "gateway-client-key"
FLEET_KEY = "bench-fleet-key"  # the pod's key for GET /fleet/state alone, as the gateway holds it
POD_ENV = {"AIO_API_KEYS": CLIENT, "AIO_ADMIN_KEYS": ADMIN, "AIO_FLEET_KEYS": FLEET_KEY}
DURATION = 1.5  # seconds per scenario and path per round: the default when bench.run is given --gateway
STREAM_CHUNKS = 64  # tokens per answer (non-stream answers carry the same 64 words in one body)
# name → (stream, concurrency)
SCENARIOS: dict[str, tuple[bool, int]] = {
    "nonstream_c1": (False, 1),
    "nonstream_c8": (False, 8),
    "stream_c8": (True, 8),
}
PROCESSES = ("gateway", "orchestrator", "service")


@dataclass
class Route:
    """One way to the model: where requests go and the key they carry."""

    host: str
    port: int
    key: str


def run(rounds: int, duration: float, stream_chunks: int = STREAM_CHUNKS) -> dict[str, Any]:
    """All rounds; returns {"paths": [...], "runs": {path: {scenario: [figures per round]}}, ...}."""
    if not (GATEWAY_VENV / "bin" / "litellm").exists():
        raise SystemExit(f"no gateway environment in {GATEWAY_VENV}: scripts/lib/gateway-venv.sh creates it")
    server_cores, client_cores = cores()
    affinity = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="aio-bench-gateway-") as tmp:
        workdir = Path(tmp)
        pin(server_cores)  # what starts now (orchestrator, its model service, the gateway) inherits it
        try:
            with _pod(workdir, stream_chunks) as orch, _gateway(workdir, orch) as (gateway_port, gateway):
                pin(client_cores)
                pids = {"gateway": _tree(gateway), "orchestrator": [orch.process.pid],
                        "service": [c.pid for c in psutil.Process(orch.process.pid).children(recursive=True)]}
                pod_port = int(orch.url.rsplit(":", 1)[1])
                paths = {"direct": Route(POD_HOST, pod_port, CLIENT), "gateway": Route("127.0.0.1", gateway_port, USER)}
                runs = _rounds(paths, pids, rounds, duration)
        finally:
            pin(affinity)
    return {"paths": list(paths), "runs": runs, "stream_chunks": stream_chunks, "litellm": litellm_version(),
            "cores": {"servers": sorted(server_cores), "load_generator": sorted(client_cores)}}


@contextmanager
def _pod(workdir: Path, stream_chunks: int) -> Iterator[Orchestrator]:
    """The pod's orchestrator with its one model, warmed by a direct request; stopped, with its service."""
    folder = workdir / "pod2"
    folder.mkdir()
    model = fake_model(MODEL, "--stream-chunks", str(stream_chunks), "--token-delay", "0")
    config = write_config(folder, {MODEL: model}, host=POD_HOST)
    orch = start_orchestrator(config, folder / "orchestrator.log", POD_ENV)
    try:
        answer = httpx.post(orch.url + "/v1/chat/completions", json=_body(False),
                            headers={"Authorization": f"Bearer {CLIENT}"}, timeout=60)
        if answer.status_code != 200:
            raise RuntimeError(f"warming {MODEL} directly: {answer.status_code} {answer.text}")
        yield orch
    finally:
        stop_orchestrator(orch)
        for proc in processes_with(f"--port {model['port']}"):  # a service the orchestrator left behind
            proc.kill()


@contextmanager
def _gateway(workdir: Path, orch: Orchestrator) -> Iterator[tuple[int, psutil.Process]]:
    """scripts/start-gateway.sh --background in front of the one pod (as tests/integration/test_fleet.py
    starts it); SIGTERM at the end, SIGKILL after 20 s, and whatever it started goes too."""
    fleet = {"pods": [{"id": "pod2", "url": orch.url, "models": [MODEL], "key_env": "POD_CLIENT_KEY",
                       "state_key_env": "POD_STATE_KEY"}]}
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    port, run_dir = free_port(), workdir / "run"
    env = {**os.environ, "AIO_RUN_DIR": str(run_dir), "AIO_GATEWAY_VENV": str(GATEWAY_VENV),
           "LITELLM_MASTER_KEY": MASTER, "AIO_GATEWAY_KEYS": USER, "POD_CLIENT_KEY": CLIENT, "POD_STATE_KEY": FLEET_KEY}
    argv = ["bash", str(REPO / "scripts" / "start-gateway.sh"), "--fleet", str(workdir / "fleet.yaml"),
            "--host", "127.0.0.1", "--port", str(port), "--background"]
    pid_file, gateway = run_dir / "gateway.pid", None
    try:
        started = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
        gateway = _process(pid_file, port)
        if started.returncode != 0 or gateway is None:
            raise RuntimeError(f"start-gateway.sh failed ({started.returncode}):\n{started.stdout}{started.stderr}")
        _warm_gateway(port)
        yield port, gateway
    finally:  # the script leaves the gateway running when it gives up waiting for it (or is killed waiting)
        gateway = gateway or _process(pid_file, port)
        if gateway is not None:
            _stop_gateway(gateway)


def _process(pid_file: Path, port: int) -> psutil.Process | None:
    """The gateway the pid file names, if that pid is still our LiteLLM (not a reused pid)."""
    try:
        process = psutil.Process(int(pid_file.read_text()))
        argv = process.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return process if "--port" in argv and str(port) in argv and any("litellm" in a for a in argv) else None


def _warm_gateway(port: int) -> None:
    """A first request through the gateway (LiteLLM's lazy set-up), once the plug-in has seen the pod."""
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=_body(False),
                            headers={"Authorization": f"Bearer {USER}"}, timeout=60)
        if answer.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"warming {MODEL} through the gateway: {answer.status_code} {answer.text}")
        time.sleep(0.5)


def _tree(process: psutil.Process) -> list[int]:
    return [process.pid] + [c.pid for c in process.children(recursive=True)]


def _stop_gateway(gateway: psutil.Process) -> None:
    try:
        members = [gateway, *gateway.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    with suppress(psutil.NoSuchProcess):
        gateway.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=20)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def litellm_version() -> str:
    done = subprocess.run([str(GATEWAY_VENV / "bin" / "python"), "-c",
                           "from importlib.metadata import version; print(version('litellm'))"],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.strip() or "unknown"


def _body(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def _request(route: Route, stream: bool) -> bytes:
    """loadgen's request with the route's key (the pod and the gateway both want one)."""
    body = json.dumps(_body(stream)).encode()
    request = loadgen.build_request(route.host, route.port, "/v1/chat/completions", body)
    line, crlf, rest = request.partition(b"\r\n")
    return line + crlf + f"Authorization: Bearer {route.key}\r\n".encode() + rest


def measure(route: Route, scenario: str, duration: float, pids: dict[str, list[int]]) -> dict[str, float]:
    stream, concurrency = SCENARIOS[scenario]
    request = _request(route, stream)
    before = {name: cpu_seconds(pids[name]) for name in PROCESSES}
    result = asyncio.run(loadgen.run(route.host, route.port, request, concurrency, duration, track_chunks=stream))
    cpu = {name: cpu_seconds(pids[name]) - before[name] for name in PROCESSES}
    done = max(result.completed, 1)
    figures = {"per_s": result.completed / result.elapsed, "p50_ms": _percentile(result.latencies_ms, 0.50),
               "p99_ms": _percentile(result.latencies_ms, 0.99), "errors": float(result.errors)}
    for name in PROCESSES:
        figures[f"{name}_cpu_us_per_request"] = cpu[name] / done * 1e6
    if stream:
        figures["ttfb_p50_ms"] = _percentile(result.ttfb_ms, 0.50)
        figures["events_per_stream"] = result.events / done
        for name in PROCESSES:
            figures[f"{name}_cpu_us_per_event"] = cpu[name] / max(result.events, 1) * 1e6
    return figures


def _rounds(paths: dict[str, Route], pids: dict[str, list[int]], rounds: int, duration: float
            ) -> dict[str, dict[str, list[dict[str, float]]]]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {s: [] for s in SCENARIOS} for p in paths}
    order = list(paths)
    for name in order:  # warm every path's connections and code, not counted
        measure(paths[name], "nonstream_c8", min(duration, 1.0), pids)
        measure(paths[name], "stream_c8", min(duration, 0.5), pids)
    for round_index in range(rounds):
        for scenario in SCENARIOS:
            rotated = order[round_index % len(order):] + order[: round_index % len(order)]
            for name in rotated:
                runs[name][scenario].append(measure(paths[name], scenario, duration, pids))
        print(f"  round {round_index + 1}/{rounds} done", flush=True)
    return runs


# (scenario, figure, label): throughput and latency, direct vs through the gateway.
ROWS = [
    ("nonstream_c1", "per_s", "req/s, c=1"), ("nonstream_c1", "p50_ms", "p50 ms, c=1"),
    ("nonstream_c1", "p99_ms", "p99 ms, c=1"), ("nonstream_c8", "per_s", "req/s, c=8"),
    ("nonstream_c8", "p50_ms", "p50 ms, c=8"), ("nonstream_c8", "p99_ms", "p99 ms, c=8"),
    ("stream_c8", "per_s", "streams/s, c=8"), ("stream_c8", "ttfb_p50_ms", "first event p50 ms, c=8"),
    ("stream_c8", "p50_ms", "whole stream p50 ms, c=8"), ("stream_c8", "events_per_stream", "SSE events per stream"),
]
# (label, scenario, unit suffix): CPU rows, per process and path.
CPU_ROWS = [("CPU us per request, non-stream c=8", "nonstream_c8", "request"),
            ("CPU us per SSE event, stream c=8", "stream_c8", "event")]


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    direct, gateway = summary["direct"], summary["gateway"]
    header = f"{'figure':30}{'direct':>12}{'gateway':>12}{'gw/direct':>11}{'added':>11}"
    lines = [header, "-" * len(header)]
    for scenario, key, label in ROWS:
        d, g = direct[scenario][key], gateway[scenario][key]
        added = f"{g - d:+.3f}" if key.endswith("_ms") else ""
        lines.append(f"{label:30}{d:>12.3f}{g:>12.3f}{_ratio(g, d):>11}{added:>11}")
    header = f"\n{'CPU (own process, psutil)':30}{'direct path':>14}{'gateway path':>14}"
    lines += [header, "-" * (len(header) - 1)]
    for label, scenario, unit in CPU_ROWS:
        lines.append(label)
        key = f"_cpu_us_per_{unit}"
        for name in PROCESSES:
            on_direct = "-" if name == "gateway" else f"{direct[scenario][name + key]:.1f}"
            lines.append(f"  {name:28}{on_direct:>14}{gateway[scenario][name + key]:>14.1f}")
        d_all = sum(direct[scenario][n + key] for n in PROCESSES if n != "gateway")
        g_all = sum(gateway[scenario][n + key] for n in PROCESSES)
        lines.append(f"  {'all servers (gw/direct ' + _ratio(g_all, d_all) + ')':28}{d_all:>14.1f}{g_all:>14.1f}")
        own = _ratio(gateway[scenario]["gateway" + key], direct[scenario]["orchestrator" + key])
        lines.append(f"  {'gateway / orchestrator':28}{own:>28}")
    return "\n".join(line.rstrip() for line in lines)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base and not math.isnan(base) and base > 0 else "-"


def errors(raw: dict[str, Any]) -> int:
    """Failed requests (not 200, or a lost connection) over every run, warm-up excluded."""
    return int(sum(r["errors"] for by_scenario in raw["runs"].values() for rs in by_scenario.values() for r in rs))

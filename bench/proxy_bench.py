"""Proxy overhead: the same fake backend measured directly, through nginx and through the orchestrator
(and, where nginx has njs, through the orchestrator's nginx data plane: path "orch+nginx", its CPU that of
the orchestrator and its nginx together).

The orchestrator starts the backend itself (it is a model in a generated models.yaml),
so all three paths reach one backend process. Servers (backend, orchestrator, nginx)
are pinned to one core, this load generator to another, and every scenario runs for
each path in turn, round after round, so drifting machine load hits all paths alike.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen
from bench.common import backend_command, cores, cpu_seconds, free_port, pin, start_nginx, start_orchestrator
from model_orchestrator.dataplane.nginx import find_njs_module

PLANE = "orch+nginx"  # the orchestrator behind its nginx data plane: issue #25's targets are measured on it

# name → (stream, concurrency, chunks, chunk interval in ms)
SCENARIOS: dict[str, tuple[bool, int, int, float]] = {
    "nonstream_c1": (False, 1, 0, 0),
    "nonstream_c32": (False, 32, 0, 0),
    "stream_c1": (True, 1, 64, 0),
    "stream_c16": (True, 16, 64, 0),
    "paced_c1": (True, 1, 64, 2.0),  # per-chunk latency, with the backend pacing tokens 2 ms apart
}


def _body(stream: bool, chunks: int, interval_ms: float) -> bytes:
    return json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                       "bench_chunks": chunks, "bench_interval_ms": interval_ms}).encode()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(port: int, scenario: str, duration: float, proxy_pids: list[int]) -> dict[str, float]:
    stream, concurrency, chunks, interval = SCENARIOS[scenario]
    request = loadgen.build_request("127.0.0.1", port, "/v1/chat/completions", _body(stream, chunks, interval))
    cpu_before = cpu_seconds(proxy_pids)
    result = asyncio.run(loadgen.run("127.0.0.1", port, request, concurrency, duration, track_chunks=stream))
    cpu = cpu_seconds(proxy_pids) - cpu_before
    done = max(result.completed, 1)
    figures = {
        "per_s": result.completed / result.elapsed,
        "p50_ms": _percentile(result.latencies_ms, 0.50),
        "p99_ms": _percentile(result.latencies_ms, 0.99),
        "errors": float(result.errors),
        "proxy_cpu_us_per_request": cpu / done * 1e6,
    }
    if stream:
        figures["ttfb_p50_ms"] = _percentile(result.ttfb_ms, 0.50)
        figures["chunk_delay_p50_ms"] = _percentile(result.chunk_delay_ms, 0.50)
        figures["proxy_cpu_us_per_event"] = cpu / max(result.events, 1) * 1e6
    return figures


def run(rounds: int, duration: float, scenarios: list[str] | None = None,
        baseline: Path | None = None) -> dict[str, Any]:
    """All rounds; returns {"paths": [...], "runs": {path: {scenario: [figures per round]}}}.

    ``baseline``: another checkout (e.g. ``git worktree add /tmp/base main``) whose
    orchestrator is measured as the path "baseline", interleaved with this one: a
    before/after comparison in one run, on one machine state.
    """
    server_cores, client_cores = cores()
    names = scenarios or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="aio-bench-") as tmp:
        workdir = Path(tmp)
        backend_port = free_port()
        orchs = {"orchestrator": start_orchestrator(workdir / "current", _bench_model(backend_port), server_cores)}
        if baseline is not None:  # its own backend: each orchestrator starts the backend it proxies to
            orchs["baseline"] = start_orchestrator(workdir / "baseline", _bench_model(free_port()), server_cores,
                                                   repo=baseline)
        if has_njs():  # the data plane (settings.data_plane.kind: nginx): nginx in front, the model pinned
            orchs[PLANE] = start_orchestrator(workdir / "plane", _bench_model(free_port(), pinned=True), server_cores,
                                              data_plane={"kind": "nginx"})
        nginx = None
        try:
            for orch in orchs.values():
                _wait_ready(orch)
            nginx = start_nginx(workdir, backend_port, server_cores)
            pin(client_cores)
            paths: dict[str, tuple[int, list[int]]] = {"direct": (backend_port, [])}
            if nginx is not None:
                paths["nginx"] = (nginx.port, nginx.pids())
            for label, orch in orchs.items():
                paths[label] = (int(orch.url.rsplit(":", 1)[1]), [orch.process.pid, *nginx_pids(orch.process.pid)])
            runs = _rounds(paths, names, rounds, duration)
        finally:
            if nginx is not None:
                nginx.stop()
            for orch in orchs.values():
                orch.stop()
    return {"paths": list(paths), "runs": runs, "cores": {"servers": sorted(server_cores),
                                                           "load_generator": sorted(client_cores)}}


def _bench_model(port: int, pinned: bool = False) -> dict[str, object]:
    return {"bench": {"type": "text", "command": backend_command(), "port": port, "preload": True,
                      "startup_time": 60, "pinned": pinned, "vram_gb": 0}}


def has_njs() -> bool:
    """Whether nginx and its njs module are installed (the data plane's path is measured then)."""
    return shutil.which("nginx") is not None and find_njs_module(None) is not None


def nginx_pids(orchestrator_pid: int) -> list[int]:
    """The orchestrator's nginx (master and workers), once the route table has settled (a worker per reload)."""
    time.sleep(1.0)
    children = psutil.Process(orchestrator_pid).children(recursive=True)
    return [child.pid for child in children if child.name() == "nginx"]


def _wait_ready(orch: Any) -> None:
    deadline = time.monotonic() + 60
    while orch.status()["bench"]["state"] != "ready":
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend did not start; see {orch.log}")
        time.sleep(0.05)


def _rounds(paths: dict[str, tuple[int, list[int]]], names: list[str], rounds: int, duration: float
            ) -> dict[str, dict[str, list[dict[str, float]]]]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {s: [] for s in names} for p in paths}
    order = list(paths)
    for path in order:  # warm every path's connections and code
        measure(paths[path][0], "nonstream_c32", min(duration, 1.0), [])
    for round_index in range(rounds):
        for scenario in names:
            rotated = order[round_index % len(order):] + order[: round_index % len(order)]
            for path in rotated:
                port, pids = paths[path]
                runs[path][scenario].append(measure(port, scenario, duration, pids))
        print(f"  round {round_index + 1}/{rounds} done", flush=True)
    return runs


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Median of each figure over the rounds: {path: {scenario: {figure: value}}}."""
    return {
        path: {
            scenario: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for scenario, results in by_scenario.items() if results
        }
        for path, by_scenario in raw["runs"].items()
    }

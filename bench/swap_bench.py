"""Swap overhead: what the orchestrator adds on top of a service's own start and stop times.

Two models run the fake backend with a known pretend load time and no ``vram_gb``
(each needs the whole GPU), so every switch stops one and starts the other. First the
service's own times are measured without the orchestrator: spawn → first 200 from
/health (polled every millisecond) and SIGTERM → exit. Then through the orchestrator:

* cold: nothing running, one request → first byte; overhead = that - own spawn-to-ready;
* alternating: a, b, a, b, ... → each first byte; overhead = that - (own stop + own spawn-to-ready).
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import backend_command, cores, free_port, pin, spawn_pinned, start_orchestrator

_BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


def own_times(load_time: float, server_cores: set[int]) -> tuple[float, float]:
    """(spawn→ready, SIGTERM→exit) seconds of the backend started directly, without us."""
    port = free_port()
    argv = [a.replace("{host}", "127.0.0.1").replace("{port}", str(port)) for a in backend_command()]
    argv[-1] = str(load_time)
    began = time.monotonic()
    proc = spawn_pinned(argv, server_cores, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _poll_health(f"http://127.0.0.1:{port}/health", proc)
    ready = time.monotonic() - began
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait()  # blocking waitpid: exact (a timeout makes Popen poll with sleeps of up to 50 ms)
    return ready, time.monotonic() - began


def _poll_health(url: str, proc: subprocess.Popen[bytes]) -> None:
    with httpx.Client(timeout=1) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("backend exited during start")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.001)


def first_byte(client: httpx.Client, model: str) -> float:
    body = json.loads(_BODY) | {"model": model}
    began = time.monotonic()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        next(response.iter_raw())
        elapsed = time.monotonic() - began
        assert response.status_code == 200, response.status_code
    return elapsed


def run(load_time: float = 0.5, repeats: int = 5) -> dict[str, Any]:
    """Interleaved rounds: own start/stop, a cold start and two swaps through the orchestrator."""
    server_cores, client_cores = cores()
    pin(client_cores)
    models = {name: {"type": "text", "command": [*backend_command()[:-1], str(load_time)], "port": free_port(),
                     "startup_time": 60, "stop_timeout": 15} for name in ("a", "b")}
    ready, stop, cold, swaps = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="aio-swap-") as tmp:
        orch = start_orchestrator(Path(tmp), models, server_cores, batch_window=0)
        try:
            with httpx.Client(base_url=orch.url, timeout=120) as client:
                for _ in range(repeats):
                    own_ready, own_stop = own_times(load_time, server_cores)
                    ready.append(own_ready)
                    stop.append(own_stop)
                    client.post("/admin/models/a/unload")
                    client.post("/admin/models/b/unload")
                    cold.append(first_byte(client, "a"))
                    swaps += [first_byte(client, "b"), first_byte(client, "a")]
        finally:
            orch.stop()
    own_ready, own_stop = statistics.median(ready), statistics.median(stop)
    return {
        "load_time_s": load_time,
        "own_spawn_to_ready_ms": _ms(ready),
        "own_stop_ms": _ms(stop),
        "cold_first_byte_ms": _ms(cold),
        "swap_first_byte_ms": _ms(swaps),
        "cold_overhead_ms": round((statistics.median(cold) - own_ready) * 1000, 1),
        "swap_overhead_ms": round((statistics.median(swaps) - own_ready - own_stop) * 1000, 1),
    }


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 1) for v in values]

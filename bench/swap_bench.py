"""Swap overhead: what the orchestrator adds on top of a service's own start and stop times.

Two models run the fake backend with a known pretend load time and no ``vram_gb``
(each needs the whole GPU), so every switch stops one and starts the other.

A service's own start time varies by tens of milliseconds from one start to the next
(Python imports), so each start is charged with its own figures: the backend reports
when its code began (``started_ns``) and when it was listening (``listening_ns``).
Started directly, without the orchestrator, it also gives the interpreter's start-up
(spawn → ``started_ns``) and its stop time (SIGTERM → exit). Then, per request:

* cold (nothing running): overhead = first byte - (interpreter + started→listening);
* swap (the other model running): overhead = first byte - (interpreter + started→listening + stop).
"""

from __future__ import annotations

import json
import random
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
    """(interpreter start-up, SIGTERM→exit) seconds of the backend started directly, without us."""
    port = free_port()
    argv = [a.replace("{host}", "127.0.0.1").replace("{port}", str(port)) for a in backend_command()]
    argv[-1] = str(load_time)
    spawned_ns = time.monotonic_ns()
    proc = spawn_pinned(argv, server_cores, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timings = _poll_health(f"http://127.0.0.1:{port}/health", proc)
    # uvicorn notices SIGTERM on a 100 ms tick; a signal sent right after start-up would
    # always hit the same phase of it. The orchestrator's signals land at random phases.
    time.sleep(random.uniform(0, 0.1))
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait()  # blocking waitpid: exact (a timeout makes Popen poll with sleeps of up to 50 ms)
    return (timings["started_ns"] - spawned_ns) / 1e9, time.monotonic() - began


def _poll_health(url: str, proc: subprocess.Popen[bytes]) -> dict[str, int]:
    with httpx.Client(timeout=1) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("backend exited during start")
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.HTTPError:
                time.sleep(0.001)


def _own_load(client: httpx.Client, model: str) -> float:
    """started→listening seconds of the instance of ``model`` now running."""
    timings = client.get(f"/upstream/{model}/health").json()
    return float(timings["listening_ns"] - timings["started_ns"]) / 1e9


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
    interp, stop, cold, swap = [], [], [], []  # cold/swap: (first byte, that start's own load) pairs
    with tempfile.TemporaryDirectory(prefix="aio-swap-") as tmp:
        orch = start_orchestrator(Path(tmp), models, server_cores, batch_window=0)
        try:
            with httpx.Client(base_url=orch.url, timeout=120) as client:
                for _ in range(repeats):
                    own_interp, own_stop = own_times(load_time, server_cores)
                    interp.append(own_interp)
                    stop.append(own_stop)
                    client.post("/admin/models/a/unload")
                    client.post("/admin/models/b/unload")
                    cold.append((first_byte(client, "a"), _own_load(client, "a")))
                    for model in ("b", "a"):
                        swap.append((first_byte(client, model), _own_load(client, model)))
        finally:
            orch.stop()
    base = statistics.median(interp)
    cold_over = [fb - load - base for fb, load in cold]
    swap_over = [fb - load - base - statistics.median(stop) for fb, load in swap]
    return {
        "load_time_s": load_time,
        "own_interpreter_start_ms": _ms(interp),
        "own_stop_ms": _ms(stop),
        "own_load_ms": _ms([load for _, load in cold + swap]),
        "cold_first_byte_ms": _ms([fb for fb, _ in cold]),
        "swap_first_byte_ms": _ms([fb for fb, _ in swap]),
        "cold_overhead_each_ms": _ms(cold_over),
        "swap_overhead_each_ms": _ms(swap_over),
        "cold_overhead_ms": round(statistics.median(cold_over) * 1000, 1),
        "swap_overhead_ms": round(statistics.median(swap_over) * 1000, 1),
    }


def _ms(values: list[float]) -> list[float]:
    return [round(v * 1000, 1) for v in values]

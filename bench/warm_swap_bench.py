"""Warm swap: alternate two models A↔B, cold (stop and start) against warm (park and restore).

    .venv/bin/python -m bench.warm_swap_bench                  # CPU: echo services with modelled costs
    .venv/bin/python -m bench.warm_swap_bench --swaps 20 --load-seconds 2 --park-seconds 0.2 --restore-seconds 0.3
    python -m bench.warm_swap_bench --config model-orchestrator/models.yaml \\
        --models qwen2.5-7b-instruct flux.1-schnell --swaps 6   # on a GPU pod: the real models

Each mode runs its own orchestrator: ``host_memory_gb: 0`` (never park: every swap is a cold
start) and ``host_memory_gb: auto`` (park when host memory allows). Per swap it records the
first byte of a request for the model that was not loaded, and the first byte of the same
request once that model is ready (inference plus proxying); the swap's cost is their difference.

On CPU the models are echo services (models/echo/server.py) that take a known time to load,
park and restore (``--load-seconds`` etc.), so the orchestrator's own overhead per warm swap is
``swap cost - (park + restore)``: what it adds on top of the services' own work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import REPO, Orchestrator, cores, free_port, pin, start_orchestrator

# A small request per model type: the path and body the swap is timed with.
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    "image": ("/v1/images/generations", {"prompt": "a red cube", "size": "256x256", "n": 1}),
    "audio": ("/v1/audio/speech", {"input": "calm piano", "voice": "default"}),
    "embedding": ("/v1/embeddings", {"input": "hello"}),
    "custom": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
}


def echo_models(load: float, park: float, restore: float) -> dict[str, Any]:
    """Two echo services that cannot share a pretend 10 GB GPU (6 GB each)."""
    args = ["--load-seconds", str(load), "--park-seconds", str(park), "--restore-seconds", str(restore)]
    return {name: {"type": "text", "service_script": "models/echo/server.py", "args": ["--served-name", name, *args],
                   "port": free_port(), "vram_gb": 6, "startup_time": 60} for name in ("a", "b")}


def first_byte(client: httpx.Client, model: str, kind: str) -> float:
    path, body = REQUESTS[kind]
    began = time.monotonic()
    with client.stream("POST", path, json={**body, "model": model}) as response:
        next(response.iter_raw(), b"")
        elapsed = time.monotonic() - began
        if response.status_code != 200:
            raise RuntimeError(f"{model}: {response.status_code} {response.read()[:300]!r}")
    return elapsed


def alternate(orch: Orchestrator, models: dict[str, str], swaps: int, headers: dict[str, str]) -> dict[str, Any]:
    """Swap to each model in turn ``swaps`` times: (swap first byte, ready first byte) pairs, and /status."""
    names = list(models)
    pairs: list[tuple[float, float]] = []
    with httpx.Client(base_url=orch.url, timeout=1800, headers=headers) as client:
        for name in names:  # each model's first load is cold in both modes: not counted
            first_byte(client, name, models[name])
        for i in range(swaps):
            name = names[i % 2]
            swap = first_byte(client, name, models[name])
            ready = first_byte(client, name, models[name])
            pairs.append((swap, ready))
        status = httpx.get(orch.url + "/status", headers=headers, timeout=30).json()["models"]
    return {"swap_first_byte_s": [round(s, 4) for s, _ in pairs], "ready_first_byte_s": [round(r, 4) for _, r in pairs],
            "swap_cost_s": [round(s - r, 4) for s, r in pairs],
            "states": {name: status[name]["state"] for name in names},
            "park": {name: status[name]["park"] for name in names}}


def run_mode(models: dict[str, Any], kinds: dict[str, str], host_memory: float | str, swaps: int,
             settings: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    server_cores, client_cores = cores()
    pin(client_cores)
    with tempfile.TemporaryDirectory(prefix="aio-warm-") as tmp:
        orch = start_orchestrator(Path(tmp), models, server_cores, **{**settings, "host_memory_gb": host_memory})
        try:
            return alternate(orch, kinds, swaps, headers)
        finally:
            orch.stop()


def summarize(cold: dict[str, Any], warm: dict[str, Any], modelled: float | None) -> dict[str, Any]:
    cold_cost, warm_cost = statistics.median(cold["swap_cost_s"]), statistics.median(warm["swap_cost_s"])
    summary = {"cold_swap_s": round(cold_cost, 4), "warm_swap_s": round(warm_cost, 4),
               "cold_over_warm": round(cold_cost / warm_cost, 2) if warm_cost > 0 else None,
               "warm_swaps_parked": sum(p["parks"] for p in warm["park"].values())}
    if modelled is not None:  # CPU: the services' own park + restore time is known
        overhead = [cost - modelled for cost in warm["swap_cost_s"]]
        summary["warm_overhead_ms_each"] = [round(o * 1000, 1) for o in overhead]
        summary["warm_overhead_ms"] = round(statistics.median(overhead) * 1000, 1)
    return summary


def gpu_setup(config: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """The models and settings of a real models.yaml, on loopback (models, their types, settings)."""
    raw = yaml.safe_load(config.read_text())
    models = {name: raw["models"][name] for name in names}
    settings = {k: v for k, v in raw.get("settings", {}).items() if k not in ("port", "log_dir", "host", "base_dir")}
    settings["base_dir"] = str((config.parent / raw.get("settings", {}).get("base_dir", ".")).resolve())
    return models, {name: models[name]["type"] for name in names}, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--load-seconds", type=float, default=1.0, help="CPU mode: modelled load time")
    parser.add_argument("--park-seconds", type=float, default=0.2, help="CPU mode: modelled park time")
    parser.add_argument("--restore-seconds", type=float, default=0.3, help="CPU mode: modelled restore time")
    parser.add_argument("--config", type=Path, help="GPU mode: a models.yaml with the real models")
    parser.add_argument("--models", nargs=2, metavar="NAME", help="GPU mode: the two models to alternate")
    parser.add_argument("--api-key", help="GPU mode: a key, if the config's settings require one")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-warm-swap.json")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.config:
        models, kinds, settings = gpu_setup(args.config, args.models or parser.error("--config needs --models"))
        modelled = None
    else:
        models = echo_models(args.load_seconds, args.park_seconds, args.restore_seconds)
        kinds, settings = {"a": "text", "b": "text"}, {"gpu_memory_gb": 10, "base_dir": str(REPO), "batch_window": 0}
        modelled = args.park_seconds + args.restore_seconds
    print(f"warm swap: {args.swaps} swaps between {' and '.join(kinds)}, cold then warm", flush=True)
    cold = run_mode(models, kinds, 0, args.swaps, settings, headers)
    warm = run_mode(models, kinds, "auto", args.swaps, settings, headers)
    summary = summarize(cold, warm, modelled)
    for key, value in summary.items():
        print(f"  {key}: {value}")
    result = {"settings": vars(args) | {"config": str(args.config) if args.config else None, "out": str(args.out)},
              "cold": cold, "warm": warm, "summary": summary}
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

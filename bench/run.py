"""Run the benchmarks and print each figure with its ratio to direct access and to nginx.

    .venv/bin/python -m bench.run                 # full run: 3 interleaved rounds, ~3 minutes
    .venv/bin/python -m bench.run --smoke         # seconds: checks the harness runs (used by the tests)
    .venv/bin/python -m bench.run --out results.json --rounds 5 --duration 5
    .venv/bin/python -m bench.run --proxy-only --baseline /tmp/base   # before/after: another checkout beside this one
    .venv/bin/python -m bench.run --gateway       # only the gateway (LiteLLM + plug-in) vs a pod directly, ~1 minute

Writes every figure of every round, the medians and the target checks to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import gateway_bench, proxy_bench, swap_bench

# (label, scenario, figure, comparison, limit): the targets of the benchmarks issue.
TARGETS = [
    ("server CPU per non-stream request (us)", "nonstream_c32", "proxy_cpu_us_per_request", "<=", 300.0),
    ("server CPU per streamed event (us)", "stream_c16", "proxy_cpu_us_per_event", "<=", 10.0),
    ("streams/s at c=16 (x direct)", "stream_c16", "per_s@ratio", ">=", 0.5),
    ("added per-chunk latency p50 (ms)", "paced_c1", "chunk_delay_p50_ms@added", "<=", 0.15),
    # issue #25, a data path close to nginx's
    ("#25 server CPU per non-stream request (us)", "nonstream_c32", "proxy_cpu_us_per_request", "<=", 150.0),
    ("#25 server CPU per streamed event (us)", "stream_c16", "proxy_cpu_us_per_event", "<=", 6.0),
    ("#25 non-stream req/s at c=32 (x direct)", "nonstream_c32", "per_s@ratio", ">=", 0.5),
]
# Rows whose difference from direct access is printed too: the latency each path adds.
_ADDED = frozenset({"p50_ms", "p99_ms", "ttfb_p50_ms", "chunk_delay_p50_ms"})
ROWS = [
    ("nonstream_c1", "per_s", "req/s, c=1"), ("nonstream_c1", "p50_ms", "p50 ms, c=1"),
    ("nonstream_c1", "p99_ms", "p99 ms, c=1"), ("nonstream_c32", "per_s", "req/s, c=32"),
    ("nonstream_c32", "p50_ms", "p50 ms, c=32"), ("nonstream_c32", "p99_ms", "p99 ms, c=32"),
    ("nonstream_c32", "proxy_cpu_us_per_request", "proxy CPU us/request, c=32"),
    ("stream_c1", "per_s", "streams/s, c=1"), ("stream_c1", "ttfb_p50_ms", "first chunk p50 ms, c=1"),
    ("stream_c16", "per_s", "streams/s, c=16"), ("stream_c16", "ttfb_p50_ms", "first chunk p50 ms, c=16"),
    ("stream_c16", "proxy_cpu_us_per_event", "proxy CPU us/event, c=16"),
    ("paced_c1", "chunk_delay_p50_ms", "chunk delay p50 ms, paced c=1"),
]


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    paths = list(summary)
    header = f"{'figure':34}" + "".join(f"{p:>14}" for p in paths)
    header += f"{'orch/direct':>13}" + (f"{'orch/nginx':>12}" if "nginx" in paths else "")
    header += f"{'plane/direct':>14}" if proxy_bench.PLANE in paths else ""
    header += f"{'orch/baseline':>15}" if "baseline" in paths else ""
    header += f"{'orch added ms':>15}"
    lines = [header, "-" * len(header)]
    for scenario, key, label in ROWS:
        values = {p: summary[p][scenario].get(key, math.nan) for p in paths}
        line = f"{label:34}" + "".join(f"{values[p]:>14.3f}" for p in paths)
        line += f"{_ratio(values['orchestrator'], values['direct']):>13}"
        if "nginx" in paths:
            line += f"{_ratio(values['orchestrator'], values['nginx']):>12}"
        if proxy_bench.PLANE in paths:
            line += f"{_ratio(values[proxy_bench.PLANE], values['direct']):>14}"
        if "baseline" in paths:
            line += f"{_ratio(values['orchestrator'], values['baseline']):>15}"
        if key in _ADDED:
            line += f"{values['orchestrator'] - values['direct']:>+15.3f}"
        lines.append(line)
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base and not math.isnan(base) and base > 0 else "-"


def check_targets(summary: dict[str, dict[str, dict[str, float]]], swap: dict[str, Any] | None
                  ) -> list[dict[str, Any]]:
    """Each target with its measured value; the swap targets only when the swap benchmark ran."""
    direct = summary["direct"]
    checks = []
    for label, scenario, figure, comparison, limit in TARGETS:
        key, _, mode = figure.partition("@")
        # #25's are the data plane's (nginx in front) where it ran, the orchestrator's alone otherwise
        path = proxy_bench.PLANE if label.startswith("#25") and proxy_bench.PLANE in summary else "orchestrator"
        value = summary[path][scenario][key]
        if mode == "ratio":
            value /= direct[scenario][key]
        elif mode == "added":
            value -= direct[scenario][key]
        checks.append(_check(f"{label} [{path}]", value, comparison, limit))
    if swap is None:
        return checks
    checks.append(_check("swap overhead (ms)", swap["swap_overhead_ms"], "<=", 100.0))
    checks.append(_check("cold-start overhead (ms)", swap["cold_overhead_ms"], "<=", 100.0))
    return checks


def _print_checks(checks: list[dict[str, Any]]) -> None:
    print("targets:")
    for check in checks:
        print(f"  [{'met ' if check['met'] else 'MISS'}] {check['target']}: {check['value']} ({check['limit']})")


def _check(label: str, value: float, comparison: str, limit: float) -> dict[str, Any]:
    met = value <= limit if comparison == "<=" else value >= limit
    return {"target": label, "value": round(value, 3), "limit": f"{comparison} {limit:g}", "met": met}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
            "versions": {name: version(name) for name in ("uvicorn", "uvloop", "httptools")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, help="seconds per scenario and path per round "
                        f"(default 3; {gateway_bench.DURATION:g} with --gateway)")
    parser.add_argument("--swap-repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="1 short round: checks that everything runs")
    parser.add_argument("--out", help="default bench/results.json (bench/results-gateway.json with --gateway)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose orchestrator is measured beside "
                        "this one, interleaved (e.g. `git worktree add /tmp/base main`): before/after in one run")
    parser.add_argument("--proxy-only", action="store_true", help="skip the swap benchmark")
    parser.add_argument("--gateway", action="store_true", help="only the gateway benchmark (gateway_bench.py): "
                        "the same requests to a pod's orchestrator directly and through LiteLLM + the plug-in")
    args = parser.parse_args(argv)
    if args.gateway and (args.baseline is not None or args.proxy_only):
        parser.error("--gateway runs the gateway benchmark alone: without --baseline or --proxy-only")
    if args.duration is None:
        args.duration = gateway_bench.DURATION if args.gateway else 3.0
    if args.out is None:
        args.out = "bench/results-gateway.json" if args.gateway else "bench/results.json"
    if args.smoke:
        args.rounds, args.duration, args.swap_repeats = 1, 0.3, 1
    if args.gateway:
        return run_gateway(args)
    print(f"proxy benchmark: {args.rounds} rounds x {args.duration:g}s per scenario and path", flush=True)
    settings = vars(args) | {"baseline": None if args.baseline is None else str(args.baseline)}
    raw = proxy_bench.run(args.rounds, args.duration, baseline=args.baseline)
    summary = proxy_bench.summarize(raw)
    print(table(summary), "\n", flush=True)
    if args.proxy_only:
        checks = check_targets(summary, None)
        _print_checks(checks)
        Path(args.out).write_text(json.dumps({"machine": machine(), "settings": settings, "cores": raw["cores"],
                                              "summary": summary, "rounds": raw["runs"], "targets": checks},
                                             indent=2))
        print(f"\nwrote {args.out}")
        return 0
    print("swap benchmark", flush=True)
    swap = swap_bench.run(load_time=0.1 if args.smoke else 0.5, repeats=args.swap_repeats)
    for key in ("own_interpreter_start_ms", "own_load_ms", "own_stop_ms", "cold_first_byte_ms",
                "swap_first_byte_ms", "cold_overhead_each_ms", "swap_overhead_each_ms"):
        print(f"  {key}: {swap[key]}")
    checks = check_targets(summary, swap)
    _print_checks(checks)
    result = {"machine": machine(), "settings": settings, "cores": raw["cores"], "summary": summary,
              "rounds": raw["runs"], "swap": swap, "targets": checks}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    print(f"gateway benchmark: starting a pod and the gateway (~20 s), then {args.rounds} rounds x "
          f"{args.duration:g}s per scenario and path", flush=True)
    raw = gateway_bench.run(args.rounds, args.duration)
    summary = proxy_bench.summarize(raw)
    errors = gateway_bench.errors(raw)
    print(f"\nLiteLLM {raw['litellm']}, {raw['stream_chunks']} tokens per answer; medians of {args.rounds} rounds")
    print(gateway_bench.table(summary) + f"\n\nfailed requests: {errors}", flush=True)
    info = machine() | {"litellm": raw["litellm"]}
    result = {"machine": info, "settings": vars(args) | {"baseline": None}, "cores": raw["cores"],
              "stream_chunks": raw["stream_chunks"], "errors": errors, "summary": summary, "rounds": raw["runs"]}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

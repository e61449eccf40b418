"""Soak: mixed traffic through the orchestrator for N minutes; does its memory or fd use creep?

    .venv/bin/python -m bench.soak                   # 30 minutes: the figures recorded in RESULTS.md
    .venv/bin/python -m bench.soak --minutes 1       # a quick look
    .venv/bin/python -m bench.soak --minutes 0.1     # seconds: checks that it runs (used by the tests)

16 clients (``--concurrency``) send, back to back: streaming chat completions (most), non-streaming
ones, embeddings, streams they abandon after a few chunks, and bad requests that must get a 4xx.
The upstreams are real model services: the echo service (``--token-delay`` between tokens, so a
stream lasts about half a second) for chat, the fake service for embeddings. Every answer is
checked (status, the echoed text, an SSE stream that ends with [DONE]); anything else is a failed
request. The orchestrator's RSS and open fds are sampled after the warm-up, every minute, at the
end (traffic still running, as at the start) and once idle. Prints a markdown table for
bench/RESULTS.md and writes every figure to ``--out``; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.common import Orchestrator, cores, free_port, pin, start_orchestrator

# Kinds of request and their share of the traffic, in percent.
MIX = {"stream": 70, "nonstream": 14, "embeddings": 8, "disconnect": 4, "bad": 4}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "bold", "wizards",
         "quietly", "hex", "jumbo", "pies"]
TIMES = "\u00d7"  # the multiplication sign RESULTS.md uses for ratios


class Failure(Exception):
    """An answer that is not what this request should get."""


@dataclass
class Tally:
    done: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in MIX})
    failures: list[str] = field(default_factory=list)  # the first few, to show what went wrong

    def record(self, kind: str, started: float, error: BaseException | None) -> None:
        if error is None:
            self.done[kind] += 1
            self.latency_ms[kind].append((time.perf_counter() - started) * 1000)
            return
        self.failed[kind] += 1
        if len(self.failures) < 10:
            self.failures.append(f"{kind}: {type(error).__name__}: {error}")


@dataclass
class Sample:
    label: str
    seconds: float  # since the start sample
    rss_mib: float
    fds: int


@dataclass
class Client:
    session: aiohttp.ClientSession
    url: str
    headers: dict[str, str]
    rng: random.Random

    def chat(self, stream: bool) -> tuple[dict[str, Any], str]:
        prompt = " ".join(self.rng.choices(WORDS, k=self.rng.randint(16, 40)))
        return {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": prompt}]}, prompt


async def stream(client: Client, abandon: bool = False) -> None:
    """A streamed chat completion: every token arrives, in order, and [DONE] ends it."""
    body, prompt = client.chat(stream=True)
    async with client.session.post(client.url + "/v1/chat/completions", json=body, headers=client.headers) as resp:
        if resp.status != 200 or resp.content_type != "text/event-stream":
            raise Failure(f"{resp.status} {resp.content_type}: {(await resp.read())[:200]!r}")
        text, events = [], []
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if abandon and len(events) == 3:
                    resp.close()  # the client goes away mid-stream
                    return
                if events[-1] != b"[DONE]":
                    event = json.loads(events[-1])
                    if "error" in event:  # the orchestrator's word that the upstream broke off
                        raise Failure(f"error event: {event['error']}")
                    text.append(event["choices"][0]["delta"].get("content") or "")
    if events[-1:] != [b"[DONE]"] or "".join(text) != prompt:
        raise Failure(f"stream broke off or garbled: last event {events[-1:]!r}, text {''.join(text)[:80]!r}")


async def nonstream(client: Client) -> None:
    body, prompt = client.chat(stream=False)
    async with client.session.post(client.url + "/v1/chat/completions", json=body, headers=client.headers) as resp:
        answer = await resp.read()
    if resp.status != 200 or json.loads(answer)["choices"][0]["message"]["content"] != prompt:
        raise Failure(f"{resp.status}: {answer[:200]!r}")


async def embeddings(client: Client) -> None:
    body = {"model": "embed", "input": " ".join(client.rng.choices(WORDS, k=8))}
    async with client.session.post(client.url + "/v1/embeddings", json=body, headers=client.headers) as resp:
        answer = await resp.read()
    if resp.status != 200 or json.loads(answer).get("path") != "/v1/embeddings":
        raise Failure(f"{resp.status}: {answer[:200]!r}")


BAD = [  # (method, path, body, headers override): each must get a 4xx with an OpenAI error envelope
    ("POST", "/v1/chat/completions", b"{oops", None),
    ("POST", "/v1/chat/completions", b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
     None),
    ("POST", "/v1/chat/completions", b'{"model": "echo", "messages": []}', None),
    ("POST", "/v1/chat/completions", b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], '
                                     b'"max_tokens": -5}', None),
    ("POST", "/v1/chat/completions", b'{"model": "echo"}', {"Authorization": "Bearer wrong-key"}),
    ("GET", "/v1/no-such-route", b"", None),
]


async def bad(client: Client) -> None:
    method, path, body, headers = client.rng.choice(BAD)
    url, headers = client.url + path, headers or client.headers
    async with client.session.request(method, url, data=body, headers=headers) as resp:
        answer = await resp.read()
    if not 400 <= resp.status < 500 or "message" not in json.loads(answer).get("error", {}):
        raise Failure(f"{method} {path}: expected a 4xx envelope, got {resp.status}: {answer[:200]!r}")


async def one_request(client: Client, kind: str) -> None:
    if kind == "stream":
        await stream(client)
    elif kind == "disconnect":
        await stream(client, abandon=True)
    else:
        await {"nonstream": nonstream, "embeddings": embeddings, "bad": bad}[kind](client)


@dataclass
class Run:
    tally: Tally = field(default_factory=Tally)
    stopping: bool = False


async def worker(client: Client, run: Run) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    while not run.stopping:
        kind = client.rng.choices(kinds, weights)[0]
        started = time.perf_counter()
        try:
            await one_request(client, kind)
        except (Failure, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError) as exc:
            run.tally.record(kind, started, exc)
        else:
            run.tally.record(kind, started, None)


async def sample(process: psutil.Process, label: str, since: float, spacing: float) -> Sample:
    """Medians of 5 readings ``spacing`` apart: under traffic the fd count moves with every connection."""
    readings, seconds = [], round(time.monotonic() - since, 1)
    for _ in range(5):
        readings.append((process.memory_info().rss / 2**20, process.num_fds()))
        await asyncio.sleep(spacing)
    rss, fds = (statistics.median(values) for values in zip(*readings, strict=True))
    return Sample(label, seconds, round(rss, 1), int(fds))


async def traffic(url: str, key: str, pid: int, args: argparse.Namespace) -> tuple[Run, list[Sample]]:
    """Warm up, then ``args.minutes`` of traffic; samples taken along the way."""
    process, run = psutil.Process(pid), Run()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        workers = [asyncio.create_task(worker(Client(session, url, {"Authorization": f"Bearer {key}"},
                                                     random.Random(args.seed + i)), run))
                   for i in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        run.tally, begin = Tally(), time.monotonic()  # the warm-up's requests are not counted
        duration, interval = args.minutes * 60, min(60.0, args.minutes * 60)
        spacing = min(0.2, duration / 100)  # a second per sample, less in a run of seconds
        samples = [await sample(process, "start", begin, spacing)]
        while (left := duration - (time.monotonic() - begin)) > 0.5:
            await asyncio.sleep(min(interval, left))
            if time.monotonic() - begin < duration - 0.5:
                samples.append(await sample(process, f"{round((time.monotonic() - begin) / 60)} min", begin,
                                             spacing))
        samples.append(await sample(process, "end", begin, spacing))  # traffic still running, as at the start
        run.stopping = True
        await asyncio.gather(*workers)
    await asyncio.sleep(min(2.0, duration / 10))  # closed connections and cancelled upstream requests settle
    samples.append(await sample(process, "idle", begin, spacing))
    return run, samples


def _models(token_delay: float) -> dict[str, Any]:
    common = {"vram_gb": 1, "preload": True, "startup_time": 60}  # both fit: no swapping during the soak
    return {
        "echo": {**common, "type": "text", "service_script": "models/echo/server.py", "port": free_port(),
                 "args": ["--token-delay", str(token_delay)]},
        "embed": {**common, "type": "embedding", "service_script": "tests/fakes/fake_service.py", "port": free_port(),
                  "args": ["--served-name", "embed"]},
    }


def _wait_ready(orch: Orchestrator, key: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = httpx.get(orch.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        if all(model["state"] == "ready" for model in listed["data"]):
            return
        time.sleep(0.1)
    raise TimeoutError(f"models did not start; see {orch.log}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cores, client_cores = cores()
    key = secrets.token_urlsafe(16)
    os.environ["AIO_API_KEYS"] = key  # inherited by the orchestrator: it serves keyed, as deployed
    with tempfile.TemporaryDirectory(prefix="aio-soak-") as tmp:
        orch = start_orchestrator(Path(tmp), _models(args.token_delay), server_cores, gpu_memory_gb=100)
        try:
            _wait_ready(orch, key)
            pin(client_cores)
            traffic_run, samples = asyncio.run(traffic(orch.url, key, orch.process.pid, args))
        finally:
            orch.stop()
    return summarize(traffic_run.tally, samples, args)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else float("nan")


def summarize(tally: Tally, samples: list[Sample], args: argparse.Namespace) -> dict[str, Any]:
    start, end = samples[0], next(s for s in samples if s.label == "end")
    rss_ratio, fds_ratio = end.rss_mib / start.rss_mib, end.fds / max(start.fds, 1)
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "requests": {kind: tally.done[kind] + tally.failed[kind] for kind in MIX},
        "failed": dict(tally.failed), "failures": tally.failures,
        "latency_ms": {kind: {"p50": _percentile(v, 0.5), "p99": _percentile(v, 0.99)}
                       for kind, v in tally.latency_ms.items()},
        "samples": [asdict(s) for s in samples],
        "rss_ratio": round(rss_ratio, 3), "fds_ratio": round(fds_ratio, 3),
        "targets": {"no failed request": not tally.failed, "RSS end/start within 10 %": abs(rss_ratio - 1) <= 0.1,
                    "open fds end/start within 10 %": abs(fds_ratio - 1) <= 0.1},
    }


LABELS = {"stream": "streams", "nonstream": "non-stream", "embeddings": "embeddings",
          "disconnect": "abandoned streams", "bad": "bad requests"}


def table(result: dict[str, Any]) -> str:
    """The markdown for bench/RESULTS.md."""
    settings, requests, samples = result["settings"], result["requests"], result["samples"]
    start, end = samples[0], next(s for s in samples if s["label"] == "end")
    mix = ", ".join(f"{LABELS[k]} {n:,}" for k, n in requests.items())
    latency = "; ".join(f"{LABELS[k]} {v['p50']:,} / {v['p99']:,}" for k, v in result["latency_ms"].items())
    lines = [
        f"| soak: {settings['minutes']:g} min, c={settings['concurrency']}, "
        f"{settings['token_delay'] * 1000:g} ms/token | |", "|---|---|",
        f"| requests | {sum(requests.values()):,} ({mix}) |",
        f"| failed requests (target 0) | **{sum(result['failed'].values())}** |",
        f"| orchestrator RSS, start → end (target ±10 %) | {start['rss_mib']} → {end['rss_mib']} MiB, "
        f"**{result['rss_ratio']:.2f}{TIMES}** |",
        f"| orchestrator open fds, start → end (target ±10 %) | {start['fds']} → {end['fds']}, "
        f"**{result['fds_ratio']:.2f}{TIMES}**; {samples[-1]['fds']} once idle |",
        f"| latency p50 / p99 ms | {latency} |",
        "", "| sample | s | RSS MiB | open fds |", "|---|---|---|---|",
    ]
    lines += [f"| {s['label']} | {s['seconds']:g} | {s['rss_mib']} | {s['fds']} |" for s in samples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="measured traffic, after the warm-up")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between the echo service's tokens")
    parser.add_argument("--warmup", type=float, help="seconds of traffic before the start sample "
                        "(default: a tenth of the run, 2 to 30 s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results-soak.json")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(30.0, max(2.0, args.minutes * 6))
    print(f"soak: {args.warmup:g} s warm-up, then {args.minutes:g} min at c={args.concurrency}", flush=True)
    result = run(args)
    print(table(result))
    for failure in result["failures"]:
        print(f"  failed: {failure}")
    for target, met in result["targets"].items():
        print(f"  [{'met ' if met else 'MISS'}] {target}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

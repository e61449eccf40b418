"""Prometheus metrics of one orchestrator (``GET /metrics``, admin scope), with prometheus-client.

Two kinds, both with a ``model`` label:

* **events**, counted where they happen: requests (by route and status), their end-to-end
  latency and time to first byte (streams and non-streams apart), tokens from ``usage``, the
  time requests waited in the queue, swaps by reason, and how long each start, stop, park and
  restore took (from the state machine's transitions);
* **state**, read at scrape time from the coordinator's snapshot (``StateCollector``): the
  state as one series per state, in flight, waiting, restarts, failures, parks and restores,
  GPU memory declared and measured (NVML), host memory held by parked models, the budgets.

Names follow vLLM's where the meaning is the same (``e2e_request_latency_seconds``,
``prompt_tokens_total``, ``generation_tokens_total``), under the ``aio_`` prefix. The data
path's figures are plain counters and lock-free histograms updated on the event loop (about
2 us per request, nothing per streamed event beyond keeping the last chunk), turned into
Prometheus families by prometheus-client at scrape time.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.host.gpu import device_used_bytes, gpu_bytes_by_pid
from core.host.memory_share import GIB
from core.supervision.service_park import gpu_bytes_of_tree
from core.supervision.service_state import ServiceState
from model_orchestrator.placement import used_gb
from model_orchestrator.routing import ENDPOINT_TYPES, UPLOAD_PATHS

if TYPE_CHECKING:
    from model_orchestrator.coordinator import Coordinator

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TRANSITION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300, 600)
KNOWN_ROUTES = frozenset({*ENDPOINT_TYPES, *UPLOAD_PATHS})
# OpenAI's chat and completions (prompt/completion), its Responses API and Anthropic's (input/output;
# the Responses API nests its details one level deep)
_USAGE = re.compile(rb'"usage"\s*:\s*\{')  # the object's start; its end is found by counting braces
_PROMPT = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')
# (state left, state entered) → the transition histogram that times it
TIMED = {
    (ServiceState.STARTING, ServiceState.READY): "start",
    (ServiceState.STOPPING, ServiceState.STOPPED): "stop",
    (ServiceState.PARKING, ServiceState.PARKED): "park",
    (ServiceState.RESTORING, ServiceState.READY): "restore",
}


def usage_tokens(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last ``usage`` object in ``tail``, if it has one. Searched from the
    end (a usage object comes last; ``"usage": null`` in earlier events is passed over): scanning the whole
    tail with the pattern cost ~3 us a request, a tenth of what the orchestrator spends on it in Python."""
    end = len(tail)
    while (start := tail.rfind(b'"usage"', 0, end)) >= 0:
        found = _USAGE.match(tail, start)
        close = _object_end(tail, found.end()) if found is not None else -1
        if close >= 0:
            usage = tail[start:close]
            prompt, completion = _PROMPT.search(usage), _COMPLETION.search(usage)
            return int(prompt.group(1)) if prompt else 0, int(completion.group(1)) if completion else 0
        end = start
    return None


def _object_end(data: bytes, pos: int) -> int:
    """The index after the ``}`` that closes the object whose ``{`` ends just before ``pos``; -1 if it is cut off.
    (A pattern matching the whole object checked every byte against two alternatives: ~2 us a request.)"""
    depth = 1
    while depth:
        close = data.find(b"}", pos)
        if close < 0:
            return -1
        opened = data.find(b"{", pos, close)
        depth, pos = (depth + 1, opened + 1) if opened >= 0 else (depth - 1, close + 1)
    return pos


class _Histogram:
    """A histogram for one event loop: counts per bucket and a sum, no locks (observe ~0.2 us,
    a fifth of prometheus-client's locked one); exposed through ``RequestCollector``."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value
        self.total += value

    def exposition(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        cumulative = [float(c) for c in accumulate(self.counts)]
        return [*zip(map(str, bounds), cumulative, strict=False), ("+Inf", cumulative[-1])]


class _ModelRequests:
    """The data path's figures for one model."""

    __slots__ = ("answered", "first_byte", "generation_tokens", "latency", "prompt_tokens", "queue_wait")

    def __init__(self) -> None:
        n = len(LATENCY_BUCKETS)
        self.answered: dict[tuple[str, int], int] = {}  # (route, status) → requests
        self.latency = (_Histogram(n), _Histogram(n))  # [stream]
        self.first_byte = (_Histogram(n), _Histogram(n))
        self.queue_wait = _Histogram(n)
        self.prompt_tokens = 0
        self.generation_tokens = 0


class Metrics:
    """The registry, the data path's figures, and the lifecycle's event metrics."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.models: dict[str, _ModelRequests] = {}
        self.swaps = Counter("aio_swaps", "Models loaded, restored, parked or stopped by the scheduler, by "
                             "reason (request, eviction, host_room, ttl, idle, admin, preload).",
                             ["model", "action", "reason"], registry=r)
        self.transition = Histogram("aio_model_transition_seconds", "How long each start, stop, park and "
                                    "restore took.", ["model", "kind"], buckets=TRANSITION_BUCKETS, registry=r)
        self.reloads = Counter("aio_config_reloads", "Reloads of models.yaml, by result: applied, unchanged, "
                               "invalid (nothing changed) or busy (a previous one still under way).",
                               ["result"], registry=r)
        r.register(RequestCollector(self.models))
        r.register(StateCollector(coordinator))
        self._entered: dict[str, float] = {}
        self.last_start: dict[str, float] = {}  # seconds its last start took (the fleet state's load_seconds)

    # -- the data path: plain arithmetic, no locks, no label lookups ----------------------------

    def request_done(self, model: str, path: str, status: int, stream: bool, began: float,
                     first_byte: float | None, tail: bytes, waited: float) -> None:
        """One answered request: its count, latency, first byte, queue wait and (from ``tail``) tokens."""
        stats = self.answered(model, path, status, stream, time.monotonic() - began,
                              None if first_byte is None else first_byte - began)
        stats.queue_wait.observe(LATENCY_BUCKETS, waited)
        if status == 200 and b'"usage"' in tail:
            tokens = usage_tokens(tail)
            if tokens is not None:
                stats.prompt_tokens += tokens[0]
                stats.generation_tokens += tokens[1]

    def answered(self, model: str, path: str, status: int, stream: bool, seconds: float,
                 first_byte: float | None) -> _ModelRequests:
        """Count one answered request and its latencies (seconds); the data plane's fast path reports its
        requests here (from nginx's log: no queue, no tokens)."""
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = _ModelRequests()
        key = (path if path in KNOWN_ROUTES else "other", status)
        stats.answered[key] = stats.answered.get(key, 0) + 1
        stats.latency[stream].observe(LATENCY_BUCKETS, seconds)
        if first_byte is not None:
            stats.first_byte[stream].observe(LATENCY_BUCKETS, first_byte)
        return stats

    # -- the lifecycle ----------------------------------------------------------------------

    def reloaded(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def swap(self, model: str, action: str, reason: str) -> None:
        self.swaps.labels(model, action, reason).inc()

    def transitioned(self, model: str, old: ServiceState, new: ServiceState) -> None:
        """Called on every state change: times starts, stops, parks and restores."""
        now = time.monotonic()
        entered = self._entered.get(model)
        self._entered[model] = now
        kind = TIMED.get((old, new))
        if kind is not None and entered is not None:
            self.transition.labels(model, kind).observe(now - entered)
            if kind == "start":
                self.last_start[model] = now - entered


class RequestCollector(Collector):
    """The data path's figures (``Metrics.models``) as Prometheus families, at scrape time."""

    def __init__(self, models: dict[str, _ModelRequests]) -> None:
        self.models = models

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily("aio_requests", "Requests answered, by route and HTTP status (499: the "
                                       "client left).", labels=["model", "route", "status"])
        latency = HistogramMetricFamily("aio_e2e_request_latency_seconds", "Request arrival to the end of its "
                                        "answer.", labels=["model", "stream"])
        first = HistogramMetricFamily("aio_time_to_first_byte_seconds", "Request arrival to the first byte of the "
                                      "answer's body (for streams: the first event).", labels=["model", "stream"])
        wait = HistogramMetricFamily("aio_queue_wait_seconds", "Time requests waited for their model (queue, swap, "
                                     "start, restore); 0 when it could serve at once.", labels=["model"])
        prompt = CounterMetricFamily("aio_prompt_tokens", "Prompt tokens, from the answers' usage.", labels=["model"])
        generated = CounterMetricFamily("aio_generation_tokens", "Generated tokens, from the answers' usage.",
                                        labels=["model"])
        for model, stats in list(self.models.items()):
            for (route, status), count in list(stats.answered.items()):
                requests.add_metric([model, route, str(status)], count)
            for stream, label in ((False, "false"), (True, "true")):
                _add(latency, [model, label], stats.latency[stream])
                _add(first, [model, label], stats.first_byte[stream])
            _add(wait, [model], stats.queue_wait)
            prompt.add_metric([model], stats.prompt_tokens)
            generated.add_metric([model], stats.generation_tokens)
        yield from (requests, latency, first, wait, prompt, generated)


def _add(family: HistogramMetricFamily, labels: list[str], histogram: _Histogram) -> None:
    if any(histogram.counts):
        family.add_metric(labels, histogram.exposition(LATENCY_BUCKETS), histogram.total)


class StateCollector(Collector):
    """Per-model state, read from the coordinator's snapshot at scrape time."""

    def __init__(self, coordinator: Coordinator, gpu_usage: Callable[[], dict[int, int] | None] = gpu_bytes_by_pid,
                 device_usage: Callable[[list[int]], dict[int, int] | None] = device_used_bytes) -> None:
        self.coordinator = coordinator
        self.gpu_usage = gpu_usage
        self.device_usage = device_usage

    def collect(self) -> Iterator[Any]:
        status = self.coordinator.status()
        used = self.gpu_usage()
        families = _families()
        for name, model in status.items():
            svc = model.service
            for state in ServiceState:
                families["state"].add_metric([name, state.value], 1.0 if svc.state is state else 0.0)
            families["in_flight"].add_metric([name], svc.in_flight)
            families["waiting"].add_metric([name], model.waiting)
            families["restarts"].add_metric([name], svc.restarts)
            families["failures"].add_metric([name], svc.failures)
            families["parks"].add_metric([name], svc.park.parks)
            families["restores"].add_metric([name], svc.park.restores)
            families["park_failures"].add_metric([name], svc.park.failures)
            if svc.spec.vram_gb is not None:
                families["vram_declared"].add_metric([name], svc.spec.vram_gb * GIB)
            measured = gpu_bytes_of_tree(svc.pid, used) if used is not None else None
            if measured is not None:
                families["vram_used"].add_metric([name], measured)
            families["host_held"].add_metric([name], svc.park.host_bytes or 0)
        yield from families.values()
        yield from _budgets(self.coordinator)
        yield from _per_gpu(self.coordinator, self.device_usage)


def _families() -> dict[str, Any]:
    m = ["model"]
    return {
        "state": GaugeMetricFamily("aio_model_state", "1 for the state the model is in, 0 for the others.",
                                   labels=["model", "state"]),
        "in_flight": GaugeMetricFamily("aio_requests_in_flight", "Requests being served now.", labels=m),
        "waiting": GaugeMetricFamily("aio_requests_waiting", "Requests waiting for the model now.", labels=m),
        "restarts": CounterMetricFamily("aio_model_restarts", "Processes started after the first.", labels=m),
        "failures": GaugeMetricFamily("aio_model_failures", "Failures on record for the restart policy.", labels=m),
        "parks": CounterMetricFamily("aio_model_parks", "Parks that succeeded.", labels=m),
        "restores": CounterMetricFamily("aio_model_restores", "Restores that succeeded.", labels=m),
        "park_failures": CounterMetricFamily("aio_model_park_failures", "Parks or restores that failed and "
                                             "fell back to a stop.", labels=m),
        "vram_declared": GaugeMetricFamily("aio_gpu_memory_declared_bytes", "The model's vram_gb.", labels=m),
        "vram_used": GaugeMetricFamily("aio_gpu_memory_used_bytes", "GPU memory the model's processes use, "
                                       "per NVML.", labels=m),
        "host_held": GaugeMetricFamily("aio_host_memory_parked_bytes", "Host memory the model reported holding "
                                       "for a restore.", labels=m),
    }


def _budgets(coordinator: Coordinator) -> Iterator[Any]:
    for name, value, what in (("aio_gpu_budget_bytes", coordinator.budget_gb, "GPU memory budget"),
                              ("aio_host_budget_bytes", coordinator.host_budget_gb, "host memory budget for "
                               "parked models")):
        if value is not None:
            family = GaugeMetricFamily(name, f"The {what} (absent: unlimited).")
            family.add_metric([], value * GIB)
            yield family


def _per_gpu(coordinator: Coordinator, device_usage: Callable[[list[int]], dict[int, int] | None]) -> Iterator[Any]:
    """Per GPU models are placed on: its budget, what the models placed on it claim, what NVML says is in
    use, and which models are placed on it (1 per model and GPU)."""
    devices = coordinator.devices
    if not devices:
        return
    views = coordinator.views()
    claimed = used_gb(views, devices, set())
    in_use = device_usage([device.index for device in devices]) or {}
    budget = GaugeMetricFamily("aio_gpu_device_budget_bytes", "A GPU's budget for models.", labels=["gpu"])
    claim = GaugeMetricFamily("aio_gpu_device_claimed_bytes", "What the models placed on a GPU claim there "
                              "(their vram_gb and process overhead; parked: what they keep).", labels=["gpu"])
    used = GaugeMetricFamily("aio_gpu_device_used_bytes", "Memory in use on a GPU, per NVML.", labels=["gpu"])
    others = GaugeMetricFamily("aio_gpu_device_others_bytes", "Memory processes not the orchestrator's hold on a "
                               "GPU, per NVML; placement keeps clear of it.", labels=["gpu"])
    placed = GaugeMetricFamily("aio_model_gpu", "1 for each GPU a model is placed on.", labels=["model", "gpu"])
    for device in devices:
        label = [str(device.index)]
        budget.add_metric(label, device.budget_gb * GIB)
        claim.add_metric(label, claimed[device.index] * GIB)
        others.add_metric(label, device.others_gb * GIB)
        if device.index in in_use:
            used.add_metric(label, in_use[device.index])
    for view in views.values():
        for index in view.devices:
            placed.add_metric([view.name, str(index)], 1.0)
    yield from (budget, claim, used, others, placed)

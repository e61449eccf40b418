"""The gateway's affinity plug-in: sends each request to the pod where its model is warm.

A LiteLLM ``CustomLogger`` whose ``async_filter_deployments`` narrows a request's deployments (one per
pod serving the model) with policy.choose, from a fresh copy of every pod's ``GET /fleet/state``.
The copy comes from a poller thread (its own event loop, all pods at once, about once a second), so
a slow or dead pod never holds up a request, and the filter itself does no I/O.

The pods come from the fleet file that render.py writes beside the proxy's config (named by
``AIO_GATEWAY_FLEET``); the key a pod's state is read with comes from the environment variable the
file names, never from a file. LiteLLM loads ``affinity`` from ``litellm_settings.callbacks``.
Each proxy worker process has its own copy: run one or two workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from litellm.integrations.custom_logger import CustomLogger

from model_orchestrator.gateway.policy import Pods, Starts, choose, failed_pods, pod_of, served_name

FLEET_ENV = "AIO_GATEWAY_FLEET"
log = logging.getLogger("aio.gateway")


@dataclass(frozen=True)
class PodSource:
    """Where one pod's state is read: its id in the gateway's config, the URL and the key's variable."""

    pod: str
    state_url: str
    key_env: str | None


@dataclass(frozen=True)
class Fleet:
    pods: tuple[PodSource, ...]
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 0.5

    @classmethod
    def read(cls, path: Path) -> Fleet:
        data = json.loads(path.read_text())
        pods = tuple(PodSource(p["pod"], p["state_url"], p.get("key_env")) for p in data["pods"])
        return cls(pods, float(data.get("poll_interval_s", 1.0)), float(data.get("poll_timeout_s", 0.5)))


class FleetAffinity(CustomLogger):  # type: ignore[misc]  # LiteLLM is untyped here (its own environment)
    def __init__(self, fleet: Fleet, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.fleet = fleet
        self.environ = os.environ if environ is None else environ
        self.pods, self.starts = Pods(), Starts()
        self.lock = threading.Lock()  # the poller thread writes pods; requests read pods and write starts
        self._stop = threading.Event()
        self._pod_up, self._polls = _series()
        self._thread = threading.Thread(target=self._poll_forever, name="aio-fleet-poller", daemon=True)

    def start(self) -> FleetAffinity:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    async def async_filter_deployments(self, model: str, healthy_deployments: list[Any], messages: Any,
                                       request_kwargs: dict[str, Any] | None = None,
                                       parent_otel_span: Any = None) -> list[Any]:
        failed = failed_pods(request_kwargs, healthy_deployments)
        name = served_name(model, healthy_deployments)
        with self.lock:
            return choose(name, healthy_deployments, pod_of, self.pods, self.starts, failed, time.monotonic())

    def _poll_forever(self) -> None:
        asyncio.run(self._poll_loop())

    async def _poll_loop(self) -> None:
        async with httpx.AsyncClient(timeout=self.fleet.poll_timeout_s) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                results = await asyncio.gather(*(self._read(client, source) for source in self.fleet.pods))
                with self.lock:
                    for source, state in zip(self.fleet.pods, results, strict=True):
                        self.pods.observed(source.pod, state, self.starts)
                        if self._pod_up is not None:
                            self._pod_up.labels(pod=source.pod).set(1 if self.pods.fresh(source.pod) else 0)
                    if self._polls is not None:
                        self._polls.inc()
                await asyncio.sleep(max(0.0, self.fleet.poll_interval_s - (time.monotonic() - began)))

    async def _read(self, client: httpx.AsyncClient, source: PodSource) -> Mapping[str, Any] | None:
        key = self.environ.get(source.key_env, "") if source.key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            answer = await client.get(source.state_url, headers=headers)
            if answer.status_code == 200:
                state = answer.json()
                return state if isinstance(state, dict) else None
            log.warning("pod %s: %s answered %d", source.pod, source.state_url, answer.status_code)
        except (httpx.HTTPError, ValueError) as error:
            log.info("pod %s: no state (%s)", source.pod, type(error).__name__)
        return None


def _series() -> tuple[Any, Any]:
    """The plug-in's series in the gateway's GET /metrics/, beside LiteLLM's own (one process, one registry):
    ``aio_gateway_pod_up{pod}``, 1 while the plug-in ranks the pod from fresh state, 0 once it dropped it;
    ``aio_gateway_state_polls_total``, rounds of polling every pod (a stalled poller stops it)."""
    try:
        from prometheus_client import REGISTRY, Counter, Gauge
    except ImportError:
        return None, None
    known = REGISTRY._names_to_collectors  # a second plug-in in one process reuses the first one's series
    up = known.get("aio_gateway_pod_up") or Gauge("aio_gateway_pod_up",
                                                   "1 while the gateway ranks the pod from its fresh state", ["pod"])
    polls = known.get("aio_gateway_state_polls") or Counter("aio_gateway_state_polls",
                                                             "Rounds of reading every pod's /fleet/state")
    return up, polls


def from_environment() -> FleetAffinity:
    path = os.environ.get(FLEET_ENV)
    if not path:
        raise RuntimeError(f"{FLEET_ENV} is not set: it names the fleet file that "
                           "`python -m model_orchestrator.gateway.render` writes beside the gateway's config")
    return FleetAffinity(Fleet.read(Path(path))).start()


_instance: list[FleetAffinity] = []


def __getattr__(name: str) -> FleetAffinity:
    """``affinity``, the object LiteLLM's config names: made (and its poller started) on first use, so
    importing this module (tests, render.py's checks) starts nothing."""
    if name != "affinity":
        raise AttributeError(name)
    if not _instance:
        _instance.append(from_environment())
    return _instance[0]

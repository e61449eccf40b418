"""Which requests nginx may send straight to a service: pure functions of the config and the services' states.

The fast path skips everything the orchestrator does per request (queueing, admission, leases, starting a
model), so it is for a model that needs none of it: one that is READY and stays READY whatever else
happens. That is a pinned model (never evicted to make room) that no idle timer stops or parks (``ttl`` 0,
``park.idle`` 0). Its concurrency is bounded as the orchestrator bounds it (``max_concurrency``, nginx's
``max_conns``); a request past it goes to the orchestrator, which queues it.

A request takes the fast path only when the body names the model by its own name (an alias would need the
body rewritten: the orchestrator does that), on a JSON route the model's type serves. Uploads (multipart),
the Responses API (stored and background responses are the orchestrator's to find and cancel), and a
request that names no model go to the orchestrator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from core.config.schema import ModelSpec, OrchestratorConfig
from model_orchestrator.routing import ENDPOINT_TYPES, UPLOAD_PATHS, declared_endpoints, serves

# The JSON routes nginx may route by the body's model; every other path always goes to the orchestrator.
FAST_ROUTES = tuple(route for route in ENDPOINT_TYPES if route not in UPLOAD_PATHS and route != "/v1/responses")
FAST_BODY_MAX = 1 << 20  # bytes: larger bodies are read to a file by nginx, and njs 0.7 cannot read those


def may_take_fast_path(spec: ModelSpec) -> bool:
    """Whether requests for ``spec`` may bypass the orchestrator while it is READY."""
    return spec.pinned and spec.ttl == 0 and spec.park.idle == 0


@dataclass(frozen=True)
class Upstream:
    """One fast-path model as nginx knows it: a named location in front of its service."""

    model: str
    location: str  # "@m0", "@m1", ...: model names may hold characters nginx names may not
    host: str
    port: int
    max_conns: int
    read_timeout: float
    socket: str | None = None  # the unix socket its service listens on too, when it does

    @property
    def address(self) -> str:
        """host:port, as the service's Host header names it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def server(self) -> str:
        """Where nginx connects: the unix socket when the service listens on one (cheaper), else its port."""
        return f"unix:{self.socket}" if self.socket else self.address


def upstreams(config: OrchestratorConfig, sockets: Mapping[str, str] | None = None) -> list[Upstream]:
    """The models that may take the fast path, in config order; ``sockets``: model → the unix socket its
    service listens on (the services that listen on one)."""
    eligible = [spec for spec in config.models.values() if may_take_fast_path(spec)]
    return [Upstream(spec.name, f"@m{number}", spec.host, spec.port, spec.max_concurrency, spec.request_timeout,
                     (sockets or {}).get(spec.name)) for number, spec in enumerate(eligible)]


def route_table(config: OrchestratorConfig, ready: Iterable[str], key_digests: Iterable[bytes] | None,
                generation: int) -> dict[str, object]:
    """What route.js reads (nginx's preloaded object): per fast route, the ready fast-path models that serve
    it by name → their location; the SHA-256 digests (hex) of the keys that reach client routes (None: no key
    is configured, every request is let through, as the orchestrator does); the table's generation."""
    ready = set(ready)
    endpoints = declared_endpoints(config)
    specs = {up.model: (up, config.models[up.model]) for up in upstreams(config) if up.model in ready}
    routes = {route: {name: up.location for name, (up, spec) in specs.items() if serves(spec, route, endpoints)}
              for route in FAST_ROUTES}
    keys = None if key_digests is None else {digest.hex(): 1 for digest in key_digests}
    return {"generation": generation, "keys": keys, "routes": {r: m for r, m in routes.items() if m}}

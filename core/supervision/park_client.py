"""The orchestrator's side of parking: the HTTP calls that park and restore one service. Mechanism only.

A ``service_script`` service parks through its own routes (core/runtime/parking.py: ``POST /offload?level=N``,
``POST /restore``); a ``command`` model through the calls its ``park:`` key declares (or the
``vllm`` preset, core/config/park.py). Either way a park is a list of calls that must each answer
2xx within ``park.timeout``; a 501 means "this service cannot park" (the orchestrator stops it
instead and remembers why). When and whom to park is decided elsewhere (the scheduler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from core.common.aio import within
from core.common.contract import PARK_PATHS
from core.config.park import HttpCall, ParkCalls
from core.config.schema import ModelSpec

log = logging.getLogger(__name__)

SERVICE_CALLS = ParkCalls(park=[HttpCall(path="/offload?level={level}")], restore=[HttpCall(path="/restore")])


class ParkFailed(Exception):
    """A park or restore call failed (the message says which and how)."""


class ParkUnsupported(ParkFailed):
    """The service answered 501: it cannot park (its engine, or its platform)."""


@dataclass(frozen=True)
class ParkOutcome:
    seconds: float
    host_bytes: int | None  # what the service reports holding in host memory (None: it does not say)


def calls_of(spec: ModelSpec) -> ParkCalls | None:
    """The calls that park and restore ``spec``, or None when it cannot be parked at all."""
    if not spec.park.enabled:
        return None
    declared = spec.park.resolved_calls()
    if declared is not None:
        return declared
    return SERVICE_CALLS if spec.service_script is not None else None


def private_paths(spec: ModelSpec) -> frozenset[str]:
    """Paths of ``spec``'s server that /upstream never forwards to: the park machinery."""
    calls = spec.park.resolved_calls()
    paths = set(PARK_PATHS) if spec.service_script is not None else set()
    if calls is not None:
        paths.update(call.route() for call in [*calls.park, *calls.restore] if not call.optional)
        paths.update(calls.private_paths)
    return frozenset(paths)


class ParkClient:
    """Sends one service's park and restore calls (with its service token)."""

    def __init__(self, spec: ModelSpec, client: httpx.AsyncClient, service_token: str | None) -> None:
        self.spec = spec
        self.calls = calls_of(spec)  # once: the scheduler asks `parkable` for every model at every decision
        self._client = client
        self._headers = {"Authorization": f"Bearer {service_token}"} if service_token else {}

    @property
    def parkable(self) -> bool:
        return self.calls is not None

    def use(self, spec: ModelSpec) -> None:
        """Park and restore by ``spec`` from now on (a reload changed its park settings)."""
        self.spec, self.calls = spec, calls_of(spec)

    async def park(self, level: int) -> ParkOutcome:
        if self.calls is None:
            raise ParkUnsupported(f"{self.spec.name} has no way to park (see its park: key)")
        return await self._run("park", self.calls.park, level)

    async def restore(self, level: int) -> ParkOutcome:
        assert self.calls is not None, "restore of a model that cannot park"
        return await self._run("restore", self.calls.restore, level)

    async def _run(self, what: str, calls: list[HttpCall], level: int) -> ParkOutcome:
        began = time.monotonic()
        try:
            host_bytes = await within(self._send_all(what, calls, level), self.spec.park.timeout)
        except asyncio.TimeoutError:
            raise ParkFailed(f"{what} took longer than park.timeout ({self.spec.park.timeout:g}s)") from None
        return ParkOutcome(time.monotonic() - began, host_bytes)

    async def _send_all(self, what: str, calls: list[HttpCall], level: int) -> int | None:
        host_bytes: int | None = None
        for call in calls:
            host_bytes = _host_bytes(await self._send(what, call, level), host_bytes)
        return host_bytes

    async def _send(self, what: str, call: HttpCall, level: int) -> Any:
        path = _fill(call.path, level, self.spec.name)
        body = _fill_json(call.body, level, self.spec.name)
        try:
            response = await self._client.request(call.method, self.spec.base_url() + path, json=body,
                                                  headers=self._headers, timeout=self.spec.park.timeout)
        except httpx.HTTPError as exc:
            return self._failed(what, call, f"{call.method} {path}: {type(exc).__name__}: {exc}")
        if response.status_code == 501:
            raise ParkUnsupported(_message(response))
        if not response.is_success:
            return self._failed(what, call, f"{call.method} {path} answered {response.status_code}: "
                                f"{_message(response)}")
        try:
            return response.json()
        except ValueError:
            return None

    @staticmethod
    def _failed(what: str, call: HttpCall, reason: str) -> None:
        if not call.optional:
            raise ParkFailed(f"{what} failed: {reason}")
        log.info("optional %s call failed (ignored): %s", what, reason)


def _fill(text: str, level: int, model: str) -> str:
    return text.replace("{level}", str(level)).replace("{model}", model)


def _fill_json(value: Any, level: int, model: str) -> Any:
    """A call's JSON body with ``{level}``/``{model}`` filled into its strings (in the parsed value, never
    the JSON text: a model name with a quote or a backslash in it must stay one string)."""
    if isinstance(value, str):
        return _fill(value, level, model)
    if isinstance(value, list):
        return [_fill_json(item, level, model) for item in value]
    if isinstance(value, dict):
        return {key: _fill_json(item, level, model) for key, item in value.items()}
    return value


def _host_bytes(answer: Any, previous: int | None) -> int | None:
    value = answer.get("pinned_host_bytes") if isinstance(answer, dict) else None
    return value if isinstance(value, int) else previous


def _message(response: httpx.Response) -> str:
    """The error message of an OpenAI envelope, else the start of the body."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or f"status {response.status_code}"

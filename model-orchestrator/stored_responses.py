"""Which model holds a stored response: ``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``.

The Responses API keeps a response in the memory of the text service that made it
(models/vllm/vllm_apis.py), and the requests that read it back or cancel it carry only its id.
Rather than remember every id that passes (which would mean parsing each answer on the data
path), the orchestrator asks the text services that are running, a handful at most, all at
once; the one that holds the response gets the request. A stopped service holds none; a parked
one is not asked (that would restore it), so its responses answer again once it is back.

Scope: client (model_orchestrator.auth: a ``/v1/`` route), like the ``POST /v1/responses`` that made them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from core.common.errors import ServiceError
from core.config.schema import ModelType
from core.service_manager import ManagedService
from core.supervision.service_state import ServiceState
from model_orchestrator.paths import upstream_target
from model_orchestrator.upstream import UpstreamError, UpstreamPool, request_head, request_start

PREFIX = "/v1/responses/"
HOLDERS: frozenset[ModelType] = frozenset({"text", "custom"})  # the types whose services may serve /v1/responses
PROBE_TIMEOUT = 5.0  # seconds a service may take to connect, and then to say whether it holds a response


def stored_response_id(method: str, path: str) -> str | None:
    """The id of ``GET /v1/responses/{id}`` or ``POST /v1/responses/{id}/cancel``; None for any other request."""
    rest = path.removeprefix(PREFIX)
    if rest == path or not rest:
        return None
    if method == "GET" and "/" not in rest:
        return rest
    response_id, _, action = rest.partition("/")
    return response_id if method == "POST" and action == "cancel" and response_id else None


def candidates(services: Iterable[ManagedService]) -> list[ManagedService]:
    """The services that may hold a stored response now: running text (or custom) services."""
    return [svc for svc in services if svc.spec.type in HOLDERS and svc.state is ServiceState.READY]


async def find_holder(pool: UpstreamPool, services: list[ManagedService], response_id: str
                      ) -> ManagedService | None:
    """The service that answers 200 to ``GET /v1/responses/{response_id}``, asked all at once; None if none does."""
    found = await asyncio.gather(*(_holds(pool, svc, response_id) for svc in services))
    return next((svc for svc, holds in zip(services, found, strict=True) if holds), None)


async def _holds(pool: UpstreamPool, svc: ManagedService, response_id: str) -> bool:
    spec = svc.spec
    start = request_start(b"GET", upstream_target(PREFIX + response_id).encode("ascii"), spec.host, spec.port)
    token = b"Authorization: Bearer %s\r\n" % svc.service_token.encode("latin-1") if svc.service_token else b""
    with contextlib.suppress(UpstreamError):  # a silent service times out after PROBE_TIMEOUT (UpstreamTimeout)
        reply = await pool.request(spec.host, spec.port, b"GET", request_head(start, b"GET", token, b""), b"",
                                   PROBE_TIMEOUT, connect_timeout=PROBE_TIMEOUT)
        try:
            return reply.status == 200
        finally:
            reply.close()  # its body is not wanted: the request that follows reads the response
    return False  # stopping, or not answering: it cannot hand the response over anyway


def not_found(response_id: str, asked: list[ManagedService]) -> ServiceError:
    running = ", ".join(svc.name for svc in asked) or "none"
    return ServiceError(
        404, f"No running model holds the response {response_id!r} (text models running: {running}). A stored "
        "response lives in the memory of the model that made it: it is gone once that model stops, and "
        "unreachable while it is parked (its next request restores it).", "response_not_found",
        param="response_id")

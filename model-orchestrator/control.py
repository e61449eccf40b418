"""The control plane: model list, health, status, logs and operator actions (FastAPI).

Nothing here is on the request data path, so a framework's conveniences are fine.
Every error leaves as an OpenAI envelope, as on the data path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query
from fastapi.responses import PlainTextResponse, StreamingResponse

from core.errors import ServiceError
from core.http_errors import install_error_handlers
from core.log_capture import TooManyFollowers
from core.redact import redact_argv
from core.service_manager import ManagedService

if TYPE_CHECKING:
    from model_orchestrator.orchestrator import Runtime


def build_control_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="ai-orchestrator", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}  # public: says only that we are up (states are in /v1/models, /status)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_entry(svc, created) for svc in runtime.manager.services.values()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return _model_entry(_service(runtime, model), created)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {
            "gpu_budget_gb": runtime.coordinator.budget_gb,
            "models": {n: _status_entry(runtime, s) for n, s in runtime.manager.services.items()},
        }

    @app.get("/logs/{model:path}", response_model=None)
    async def logs(
        model: str, lines: int = Query(200, ge=0, le=100_000), follow: bool = False
    ) -> PlainTextResponse | StreamingResponse:
        svc = _service(runtime, model)
        history = "".join(line + "\n" for line in svc.log.tail(lines))
        if not follow:
            return PlainTextResponse(history)
        try:  # before the response starts: a refusal must still be able to send its status
            queue = svc.log.follow()
        except TooManyFollowers as exc:
            raise ServiceError(429, f"{exc}; retry later or read without follow.", "too_many_followers",
                               retry_after=10) from None
        return StreamingResponse(_follow(svc, queue, history), media_type="text/plain",
                                 headers={"x-accel-buffering": "no"})

    @app.post("/admin/models/{model:path}/load")
    async def load(model: str) -> dict[str, Any]:
        svc = await runtime.coordinator.load(_service(runtime, model).name)
        return {"model": svc.name, "state": svc.state.value}

    @app.post("/admin/models/{model:path}/unload")
    async def unload(model: str) -> dict[str, Any]:
        svc = _service(runtime, model)
        await runtime.coordinator.unload(svc.name)
        return {"model": svc.name, "state": svc.state.value}

    @app.post("/admin/models/{model:path}/reset")
    async def reset(model: str) -> dict[str, Any]:
        svc = _service(runtime, model)
        svc.reset()
        return {"model": svc.name, "state": svc.state.value}

    return app


def _service(runtime: Runtime, model: str) -> ManagedService:
    return runtime.manager[runtime.index.lookup(model).name]


def _model_entry(svc: ManagedService, created: int) -> dict[str, Any]:
    spec = svc.spec
    return {
        "id": svc.name, "object": "model", "created": created, "owned_by": "ai-orchestrator",
        "type": spec.type, "state": svc.state.value, "aliases": spec.aliases, "metadata": spec.metadata,
    }


def _status_entry(runtime: Runtime, svc: ManagedService) -> dict[str, Any]:
    idle_for = time.monotonic() - svc.last_used if svc.last_used else None
    return {
        "state": svc.state.value, "pid": svc.pid, "port": svc.spec.port, "vram_gb": svc.spec.vram_gb,
        "in_flight": svc.in_flight, "waiting": runtime.coordinator.waiting(svc.name),
        "idle_seconds": None if idle_for is None else round(idle_for, 1), "started_at": svc.started_at,
        "restarts": svc.restarts, "failures": len(svc.failures), "last_error": svc.last_error,
        "pinned": svc.spec.pinned, "ttl": svc.spec.ttl, "command": redact_argv(svc.argv),
    }


async def _follow(svc: ManagedService, queue: asyncio.Queue[str], history: str) -> AsyncIterator[str]:
    try:
        yield history
        while True:
            line = await queue.get()
            batch = [line]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield "".join(f"{item}\n" for item in batch)
    finally:
        svc.log.unfollow(queue)


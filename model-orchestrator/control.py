"""The control plane: model list, health, status, logs and operator actions (FastAPI).

Nothing here is on the request data path, so a framework's conveniences are fine.
Every error leaves as an OpenAI envelope, as on the data path; a coordinator's ``Refused``
(e.g. a load that cannot fit) is mapped by the same table as there (``http_error``).
What it shows of a model comes from the coordinator's snapshots, never from the services.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.common.errors import ServiceError
from core.common.http_errors import install_error_handlers
from core.config.schema import ModelSpec
from core.host.gpu import device_used_bytes, gpu_bytes_by_pid
from core.host.gpu_inventory import Gpu
from core.host.memory_share import GIB
from core.supervision.log_capture import ServiceLog, TooManyFollowers
from core.supervision.service_park import gpu_bytes_of_tree
from core.supervision.service_state import ParkRecord, ServiceSnapshot
from model_orchestrator.coordinator import ModelStatus
from model_orchestrator.placement import Device
from model_orchestrator.pod_state import pod_state
from model_orchestrator.refusals import Refused, http_error
from model_orchestrator.ui import mount_ui

if TYPE_CHECKING:
    from model_orchestrator.orchestrator import Runtime
    from model_orchestrator.reload import Reloader


def build_control_app(runtime: Runtime, reloader: Reloader | None = None) -> FastAPI:
    app = FastAPI(title="ai-orchestrator", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    coordinator = runtime.coordinator
    created = int(time.time())

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        error = http_error(exc)
        return JSONResponse(error.body(), error.status, headers=error.headers())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}  # public: says only that we are up (states are in /v1/models, /status)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = coordinator.status().values()
        return {"object": "list", "data": [_model_entry(model.service, created) for model in models]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return _model_entry(coordinator.snapshot(_name(runtime, model)), created)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        models = coordinator.status()
        gpu_used = await asyncio.to_thread(gpu_bytes_by_pid)  # NVML: blocking calls
        return {"config": {"file": str(runtime.config.source), **runtime.loaded.entry()},
                "gpu_budget_gb": coordinator.budget_gb, "host_budget_gb": coordinator.host_budget_gb,
                "gpus": await asyncio.to_thread(_gpus_entry, runtime.gpus, coordinator.devices, models),
                "models": {n: _status_entry(m, gpu_used) for n, m in models.items()}}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        exposition = await asyncio.to_thread(generate_latest, runtime.metrics.registry)  # NVML reads block
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    @app.get("/logs/{model:path}", response_model=None)
    async def logs(
        model: str, lines: int = Query(200, ge=0, le=100_000), follow: bool = False
    ) -> PlainTextResponse | StreamingResponse:
        service_log = runtime.manager.log_of(_name(runtime, model))
        history = "".join(line + "\n" for line in service_log.tail(lines))
        if not follow:
            return PlainTextResponse(history)
        try:  # before the response starts: a refusal must still be able to send its status
            queue = service_log.follow()
        except TooManyFollowers as exc:
            raise ServiceError(429, f"{exc}; retry later or read without follow.", "too_many_followers",
                               retry_after=10) from None
        return StreamingResponse(_follow(service_log, queue, history), media_type="text/plain",
                                 headers={"x-accel-buffering": "no"})

    @app.post("/admin/models/{model:path}/load")
    async def load(model: str) -> dict[str, Any]:
        name = _name(runtime, model)
        await coordinator.load(name)  # raises Refused when it cannot: answered by refused() above
        return _action_result(coordinator.snapshot(name))

    @app.post("/admin/models/{model:path}/unload")
    async def unload(model: str) -> dict[str, Any]:
        name = _name(runtime, model)
        await coordinator.unload(name)
        return _action_result(coordinator.snapshot(name))

    @app.post("/admin/models/{model:path}/park")
    async def park(model: str) -> dict[str, Any]:
        name = _name(runtime, model)
        await coordinator.park(name)  # a park that fails stops the model: the state says which
        return _action_result(coordinator.snapshot(name))

    @app.post("/admin/models/{model:path}/reset")
    async def reset(model: str) -> dict[str, Any]:
        name = _name(runtime, model)
        coordinator.reset(name)
        return _action_result(coordinator.snapshot(name))

    @app.get("/fleet/state")
    async def fleet_state() -> dict[str, Any]:
        """What a gateway in front of several pods ranks this pod by (model_orchestrator/pod_state.py)."""
        pod = {"pod_id": runtime.config.settings.pod_id or socket.gethostname(), "boot_id": runtime.boot_id,
               "config_hash": runtime.loaded.hash, "accepting": runtime.accepting, "generated_at": time.time()}
        names = list(runtime.manager.services)
        return pod_state(pod, coordinator.views(), {name: coordinator.waiting(name) for name in names},
                         coordinator.devices or coordinator.budget_gb, time.monotonic(), runtime.metrics.last_start)

    @app.post("/admin/reload")
    async def reload() -> dict[str, Any]:
        if reloader is None:
            raise ServiceError(501, "This orchestrator was built without a reloader.", "not_implemented")
        return await reloader.reload("POST /admin/reload")  # a bad file: 400 naming it, nothing changed

    mount_ui(app)
    return app


def _name(runtime: Runtime, model: str) -> str:
    """The configured name of ``model`` (a name or an alias); 404 envelope if unknown."""
    return runtime.index.lookup(model).name


def _action_result(snapshot: ServiceSnapshot) -> dict[str, Any]:
    return {"model": snapshot.name, "state": snapshot.state.value}


def _model_entry(snapshot: ServiceSnapshot, created: int) -> dict[str, Any]:
    spec = snapshot.spec
    return {
        "id": snapshot.name, "object": "model", "created": created, "owned_by": "ai-orchestrator",
        "type": spec.type, "state": snapshot.state.value, "aliases": spec.aliases, "metadata": spec.metadata,
    }


def _status_entry(model: ModelStatus, gpu_used: dict[int, int] | None) -> dict[str, Any]:
    svc, spec = model.service, model.service.spec
    idle_for = time.monotonic() - svc.last_used if svc.last_used else None
    return {
        "state": svc.state.value, "pid": svc.pid, "port": spec.port, "vram_gb": spec.vram_gb,
        "vram_used_gb": _measured_gb(svc.pid, gpu_used), "park": _park_entry(svc.park, spec),
        "in_flight": svc.in_flight, "waiting": model.waiting,
        "idle_seconds": None if idle_for is None else round(idle_for, 1), "started_at": svc.started_at,
        "restarts": svc.restarts, "failures": svc.failures, "last_error": svc.last_error,
        "pinned": spec.pinned, "ttl": spec.ttl, "command": list(svc.command), "devices": list(svc.devices),
    }


def _gpus_entry(gpus: list[Gpu], devices: list[Device], models: dict[str, ModelStatus]) -> list[dict[str, Any]]:
    """The GPUs NVML lists for this orchestrator: their budget (None: not placed on, settings.gpus.devices),
    the models placed on each, what NVML says is in use on each now (None: unreadable), and how much of that
    processes not the orchestrator's hold (as last read: foreign_memory.py)."""
    used = device_used_bytes([gpu.index for gpu in gpus])
    placed = {device.index: device for device in devices}
    return [{"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "pci_bus_id": gpu.pci_bus_id,
             "total_gb": round(gpu.total_gb, 3),
             "budget_gb": placed[gpu.index].budget_gb if gpu.index in placed else None,
             "used_gb": None if used is None else round(used[gpu.index] / GIB, 3),
             "others_gb": round(placed[gpu.index].others_gb, 3) if gpu.index in placed else None,
             "models": sorted(name for name, model in models.items() if gpu.index in model.service.devices)}
            for gpu in gpus]


def _measured_gb(pid: int | None, gpu_used: dict[int, int] | None) -> float | None:
    """GPU memory the service's process tree uses now, per NVML; None without NVML or a process."""
    if pid is None or gpu_used is None:
        return None
    used = gpu_bytes_of_tree(pid, gpu_used)
    return None if used is None else round(used / GIB, 3)


def _park_entry(record: ParkRecord, spec: ModelSpec) -> dict[str, Any]:
    return {"enabled": spec.park.enabled and record.unsupported is None, "level": record.level,
            "host_gb": None if record.host_bytes is None else round(record.host_bytes / GIB, 3),
            "parks": record.parks, "restores": record.restores, "failures": record.failures,
            "last_seconds": None if record.seconds is None else round(record.seconds, 3),
            "last_error": record.last_error, "unsupported": record.unsupported}


async def _follow(service_log: ServiceLog, queue: asyncio.Queue[str], history: str) -> AsyncIterator[str]:
    try:
        yield history
        while True:
            line = await queue.get()
            batch = [line]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield "".join(f"{item}\n" for item in batch)
    finally:
        service_log.unfollow(queue)


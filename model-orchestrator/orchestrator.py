"""The orchestrator: one OpenAI-compatible endpoint in front of many model services.

It reads models.yaml, and for each request starts the service the request needs
(stopping others when GPU memory is short), waits until it is healthy, and proxies
the request to it, streaming included.

    python model-orchestrator/orchestrator.py --config model-orchestrator/models.yaml
    ai-orchestrator --config models.yaml          # the same, as an installed command

Module map: ``scheduler`` decides (pure), ``coordinator`` carries decisions out,
``core.service_manager`` runs the processes, ``proxy`` moves the bytes, ``control``
serves status, logs and operator actions. This file wires them together.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: import this folder as model_orchestrator
    import importlib.util
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[0] = str(_here.parent)  # the repository root (holds `core`), instead of this folder
    if importlib.util.find_spec("model_orchestrator") is None:
        _spec = importlib.util.spec_from_file_location(
            "model_orchestrator", _here / "__init__.py", submodule_search_locations=[str(_here)]
        )
        assert _spec is not None and _spec.loader is not None
        sys.modules["model_orchestrator"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["model_orchestrator"])

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvicorn

from core.common.asgi import Receive, Scope, Send
from core.common.errors import ServiceError
from core.common.log_setup import configure_logging
from core.config.load import load_config
from core.config.schema import ConfigError, OrchestratorConfig, Settings
from core.host.gpu import gpu_inventory, resolve_budget, resolve_process_overhead, wait_for_free_memory
from core.host.gpu_inventory import Gpu, InventoryError
from core.host.host_memory import resolve_host_budget
from core.service_manager import ManagedService, ServiceManager
from core.supervision.process_tree import port_holder
from core.supervision.service_state import ServiceState
from model_orchestrator import auth
from model_orchestrator.control import build_control_app
from model_orchestrator.coordinator import Coordinator
from model_orchestrator.dataplane.conf import Paths
from model_orchestrator.dataplane.nginx import NginxError, private_folder
from model_orchestrator.dataplane.plane import DataPlane
from model_orchestrator.foreign_memory import ForeignMemory
from model_orchestrator.http_server import AccessGate, CanonicalPath, RequestCap, server_options
from model_orchestrator.metrics import Metrics
from model_orchestrator.placement import Device, chosen_gpus
from model_orchestrator.proxy import Proxy
from model_orchestrator.reload import ConfigWatch, Loaded, Reloader, file_bytes
from model_orchestrator.reload_plan import config_hash
from model_orchestrator.routing import ROOT_ROUTES, ModelIndex
from model_orchestrator.stored_responses import PREFIX as STORED_RESPONSES

log = logging.getLogger("model_orchestrator")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "models.yaml"
CONFIG_ENV = "AIO_CONFIG"


def placement_devices(gpus: list[Gpu], settings: Settings) -> list[Device]:
    """The GPUs models are placed on (settings.gpus.devices of ``gpus``, default all), each with its budget:
    gpu_memory_gb (auto: its total), or its settings.gpus.cap_gb when lower, less settings.gpus.reserve_gb.
    Raises InventoryError when those settings name a GPU this pod does not have (a config for another pod)."""
    configured, chosen = settings.gpu_memory_gb, settings.gpus
    devices = [Device(gpu.index, 0.0, kind=f"{gpu.name} {gpu.total_bytes}", uuid=gpu.uuid, total_gb=gpu.total_gb,
                      reserve_gb=chosen.reserve_gb) for gpu in gpus]
    caps = {index: cap for name, cap in chosen.cap_gb.items() for index in _named(name, devices, "cap_gb")}
    devices = [dataclasses.replace(device, budget_gb=min(device.total_gb if configured == "auto" else float(configured),
                                                         caps.get(device.index, math.inf)) - chosen.reserve_gb)
               for device in devices]
    if chosen.devices is None:
        return devices
    kept = {index for name in chosen.devices for index in _named(name, devices, "devices")}
    return [device for device in devices if device.index in kept]


def _named(name: int | str, devices: list[Device], key: str) -> frozenset[int]:
    """The GPUs settings.gpus.``key`` means by ``name``; none at all is the operator's to fix."""
    indices = chosen_gpus([name], devices)
    if devices and not indices:
        raise InventoryError(f"settings.gpus.{key} names GPU {name!r}, which is none of the GPUs the orchestrator "
                             "may use (" + ", ".join(f"{d.index} {d.uuid}" for d in devices) + ", under its own "
                             "CUDA_VISIBLE_DEVICES): name one of those by index or UUID")
    return indices


async def _memory_released(first: int, reserve_gb: float, need_gb: float, devices: tuple[int, ...]) -> None:
    """Wait (bounded) until each GPU a start goes on has ``need_gb`` free beyond its reserve (settings.gpus.
    reserve_gb: what others may use there), per NVML (the first GPU: a start not placed)."""
    await asyncio.gather(*(wait_for_free_memory(need_gb + reserve_gb, index=index) for index in devices or (first,)))


class Runtime:
    """Everything one running orchestrator holds, built from one config."""

    def __init__(self, config: OrchestratorConfig, *, use_reaper: bool = True, socket_dir: Path | None = None) -> None:
        self.config = config
        self.index = ModelIndex(config)
        self.manager = ServiceManager(config, use_reaper=use_reaper, socket_dir=socket_dir)
        self.gpus = gpu_inventory() or []  # the GPUs NVML lists that our own CUDA_VISIBLE_DEVICES allows
        devices = placement_devices(self.gpus, config.settings)
        budget = devices[0].budget_gb if devices else resolve_budget(config.settings.gpu_memory_gb, self.gpus)
        released = (functools.partial(_memory_released, devices[0].index, config.settings.gpus.reserve_gb)
                    if devices else None)
        host_budget = resolve_host_budget(config.settings.host_memory_gb, config.settings.host_memory_reserve_gb)
        self.coordinator = Coordinator(self.manager, config.settings, budget, memory_released=released,
                                       host_budget_gb=host_budget, devices=devices,
                                       overhead_gb=resolve_process_overhead(config.settings.gpu_process_overhead_gb,
                                                                            self.gpus))
        self.foreign = ForeignMemory(devices, self.coordinator.use_devices)
        self.metrics = Metrics(self.coordinator)
        self.coordinator.on_swap = self.metrics.swap
        self.data_plane: DataPlane | None = None  # nginx in front (settings.data_plane.kind: nginx)
        for svc in self.manager.services.values():
            svc.on_transition = self.transitioned
        keep_alive = config.settings.stream_keep_alive or None
        self.proxy = Proxy(self.coordinator, self.index, limits=config.settings.limits, metrics=self.metrics,
                           keep_alive=keep_alive)
        self._preload: asyncio.Task[None] | None = None
        self.request_cap: RequestCap | None = None  # main()'s, resized by a reload
        self.loaded = Loaded(config_hash(file_bytes(config.source)), time.time(), "start")
        self._background: set[asyncio.Task[None]] = set()
        self.boot_id = uuid.uuid4().hex  # a gateway forgets what it knew of this pod when this changes
        self.accepting = True  # False once shutting down (GET /fleet/state)

    def adopt(self, svc: ManagedService) -> None:
        """A service a reload added: observed like the others, placed like the others."""
        svc.on_transition = self.transitioned
        self.coordinator.adopt(svc)

    def transitioned(self, name: str, old: ServiceState, new: ServiceState) -> None:
        self.metrics.transitioned(name, old, new)
        if self.data_plane is not None:
            self.data_plane.transitioned(name, old, new)

    def rebudget(self) -> None:
        """The GPU budgets of the config now (settings.gpu_memory_gb), with what others hold as last read."""
        devices = placement_devices(self.gpus, self.config.settings)
        self.coordinator.budget_gb = (devices[0].budget_gb if devices else
                                      resolve_budget(self.config.settings.gpu_memory_gb, self.gpus))
        self.foreign.rebase(devices)

    def background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task that outlives the request that began it (a reload's restarts); cancelled at stop."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def start(self) -> None:
        self.manager.open()
        if self.data_plane is not None:
            await self.data_plane.start()
        self.coordinator.start_ttl_watch()
        self.foreign.start()
        self._preload = asyncio.create_task(self.coordinator.preload(), name="preload")
        budget, host = self.coordinator.budget_gb, self.coordinator.host_budget_gb
        budgets = {device.index: device.budget_gb for device in self.coordinator.devices}
        log.info("GPUs: %s", "; ".join(
            f"{g.index} {g.name} {g.total_gb:.3g} GB {g.uuid} ({g.pci_bus_id}), "
            + (f"budget {budgets[g.index]:.3g} GB" if g.index in budgets else "not used (settings.gpus.devices)")
            for g in self.gpus) or "none (services run on the CPU)")
        log.info("serving %d models (%s); GPU budget %s; parked models may hold %s of host memory",
                 len(self.config.models), ", ".join(self.config.models),
                 "unlimited" if budget is None else f"{budget:g} GB", "unlimited" if host is None else f"{host:.3g} GB")

    async def stop(self) -> None:
        self.accepting = False
        for task in [self._preload, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.coordinator.stop_ttl_watch()
        await self.foreign.stop()
        if self.data_plane is not None:  # before the services: its requests to them finish first
            await self.data_plane.stop(self.config.settings.drain_timeout)
        await self.manager.shutdown()
        await self.proxy.close()


class OrchestratorApp:
    """The ASGI app. Layers, outermost first: lifespan (starts and stops the ``Runtime``),
    ``CanonicalPath`` (the one form of the path every layer reads and the proxy sends, or a 400),
    ``AccessGate`` (every request checked against its route's scope, model_orchestrator.auth),
    then ``route``: POST /v1/* (and the model routes outside /v1, ``ROOT_ROUTES``), /upstream/* and a stored
    response's GET and cancel on the lean data path, the rest to the control app.
    """

    def __init__(self, config: OrchestratorConfig, *, host: str | None = None, keys: auth.Keys | None = None,
                 use_reaper: bool = True, data_plane: Paths | None = None) -> None:
        # With nginx in front, services listen in its private folder too: it reaches them there.
        self.runtime = Runtime(config, use_reaper=use_reaper, socket_dir=data_plane.root if data_plane else None)
        keys = keys if keys is not None else auth.Keys.load(config)
        bind = host or config.settings.host
        self.gate = AccessGate(self.route, keys, auth.is_loopback_host(bind))
        if data_plane is not None:  # nginx listens on host:port, this app on data_plane's socket
            self.runtime.data_plane = DataPlane(config, self.runtime.manager, data_plane, lambda: self.gate.keys,
                                                self.runtime.metrics)
        self.reloader = Reloader(self.runtime, self.gate, bind)
        self.reloader.on_result = self.runtime.metrics.reloaded
        self.watch = ConfigWatch(self.reloader)
        self.control = build_control_app(self.runtime, self.reloader)
        self._gated = CanonicalPath(self.gate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self._gated(scope, receive, send)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if scope["type"] == "http" and path.startswith(STORED_RESPONSES):  # they name no model (stored_responses.py)
            await self.runtime.proxy.stored_response_route(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "POST" and (path.startswith("/v1/") or path in ROOT_ROUTES):
            await self.runtime.proxy.openai_route(scope, receive, send)
        elif scope["type"] == "http" and path.startswith("/upstream/"):
            await self.runtime.proxy.upstream_route(scope, receive, send)
        else:
            await self.control(scope, receive, send)

    def _on_sighup_reload(self) -> None:
        """SIGHUP reloads the config, as POST /admin/reload does (where this process owns its signals)."""
        async def reload() -> None:
            with contextlib.suppress(ServiceError):  # refused: the reloader has logged why
                await self.reloader.reload("SIGHUP")

        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no signals
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: self.runtime.background(reload(), "reload-sighup"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.start()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self._on_sighup_reload()
                self.watch.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.watch.stop()
                await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ai-orchestrator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)),
                        help=f"models.yaml to serve (default: ${CONFIG_ENV} or {DEFAULT_CONFIG.name} beside this file)")
    parser.add_argument("--host", help="listen address (overrides settings.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides settings.port)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    parser.add_argument("--log-file", help="log to this file (mode 0600, rotated by settings.log_max_mb and "
                        "log_backups) instead of stderr")
    parser.add_argument("--check", action="store_true", help="validate the config, print a summary, exit")
    # Preflight answers for scripts/start-all.sh, so it never re-reads the config or probes ports itself.
    parser.add_argument("--print-address", action="store_true",
                        help="print 'HOST PORT' it would listen on (after --host/--port), exit")
    parser.add_argument("--port-free", action="store_true",
                        help="exit 1, naming the holder, if HOST:PORT is in use; else exit 0 (without serving)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ai-orchestrator: invalid config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    settings = config.settings
    host, port = args.host or settings.host, args.port or settings.port
    if args.check or args.print_address or args.port_free:  # preflight: answer on stdout, never serve
        _preflight(args, config, host, port)
        return
    if args.log_file:
        configure_logging(args.log_level, args.log_file, max_bytes=int(settings.log_max_mb * 1024 * 1024),
                          backups=settings.log_backups)
    try:
        keys = auth.Keys.load(config)
    except OSError as exc:
        print(f"ai-orchestrator: cannot read a key file: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    problem = auth.exposure_problem(host, keys, settings)
    if problem is not None:
        print(f"ai-orchestrator: {problem}", file=sys.stderr)
        raise SystemExit(2)
    for warning in auth.startup_warnings(host, keys, settings):
        log.warning("%s", warning)
    holder = port_holder(host, port)
    if holder is not None:  # uvicorn would run startup (preloads) before finding out
        print(f"ai-orchestrator: cannot listen on {host}:{port}: in use by {holder}", file=sys.stderr)
        raise SystemExit(1)
    data_plane = None
    if settings.data_plane.kind == "nginx":
        if args.host or args.port:  # nginx listens where the config says
            config = config.model_copy(update={"settings": settings.model_copy(update={"host": host, "port": port})})
        data_plane = private_folder(Path(tempfile.mkdtemp(prefix="aio-data-plane-")))
    try:
        app = OrchestratorApp(config, host=host, keys=keys, data_plane=data_plane)  # reads the GPUs, before serving
    except (InventoryError, NginxError) as exc:  # GPUs that cannot be placed on, no nginx: the operator's to fix
        if data_plane is not None:
            shutil.rmtree(data_plane.root, ignore_errors=True)
        print(f"ai-orchestrator: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _serve(app, settings, {"host": host, "port": port} if data_plane is None else
           {"uds": str(data_plane.orchestrator_socket)}, args.access_log)


def _preflight(args: argparse.Namespace, config: OrchestratorConfig, host: str, port: int) -> None:
    """--check, --print-address, --port-free: answers on stdout (exit 1 when the port is taken)."""
    if args.check:
        count = f"{len(config.models)} model{'' if len(config.models) == 1 else 's'}"
        print(f"{config.source}: OK, {count}: {', '.join(config.models)}")
    if args.print_address:
        print(host, port, flush=True)  # before a --port-free failure, so the caller can name the address
    if args.port_free and (holder := port_holder(host, port)) is not None:
        print(f"ai-orchestrator: cannot listen on {host}:{port}: in use by {holder}", file=sys.stderr)
        raise SystemExit(1)


def _serve(app: OrchestratorApp, settings: Settings, address: dict[str, Any], access_log: bool) -> None:
    """Serve ``app`` on ``address`` (host and port, or nginx's socket: uds) until a signal ends it."""
    app.runtime.request_cap = cap = RequestCap(app, settings.limits.max_requests)
    try:
        uvicorn.run(
            cap, **address,
            log_config=None, access_log=access_log, lifespan="on", server_header=False, proxy_headers=False,
            timeout_graceful_shutdown=max(1, round(settings.drain_timeout)), **server_options(settings.limits),
        )
    finally:
        if app.runtime.data_plane is not None:
            shutil.rmtree(app.runtime.data_plane.paths.root, ignore_errors=True)


if __name__ == "__main__":
    main()

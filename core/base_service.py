"""The base class every model service inherits: health, lifecycle, shutdown, logging, CLI.

A service subclasses ``BaseService``, loads its model in ``load()`` (heavy imports
inside, so the module imports on a machine without torch), adds its routes in
``add_routes()``, and ends with ``MyService().run()``::

    class EchoService(BaseService):
        name = "echo"

        async def load(self) -> None:
            self.model = ...           # import torch etc. here, not at module level

        def add_routes(self, app: FastAPI) -> None:
            @app.post("/v1/chat/completions")
            async def chat(body: ChatRequest) -> dict: ...

    if __name__ == "__main__":
        EchoService().run()            # python server.py --port 8001 [--model PATH]

Lifecycle: the HTTP server binds first and answers ``/health`` with 503 while the
model loads in the background, 200 once ``load()`` (and ``warmup()``) returned, and
503 again while stopping or after a fatal error. A load failure or a ``fatal()``
call makes the process exit non-zero so the orchestrator restarts it. SIGTERM stops
accepting, lets in-flight requests finish within ``--drain-timeout``, then runs
``unload()``. Started by an orchestrator, a service takes its service token out of the
environment at startup and requires it on every route but ``/health`` (core/runtime/middleware.py).
A service that implements ``offload()``/``restore()`` can be parked by the orchestrator: its
process stays while its GPU memory is given back (core/runtime/parking.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from core.common.asgi import ASGIApp
from core.common.contract import MODEL_NAME_ENV, SERVICE_SOCKET_ENV, remove_socket
from core.common.http_errors import install_error_handlers
from core.common.log_setup import configure_logging
from core.host.memory_share import VRAM_ENV, ShareError, share_from_env
from core.runtime.health import Health
from core.runtime.listeners import listening_sockets
from core.runtime.middleware import (
    CancelOnDisconnect,
    ConcurrencyCap,
    ReadinessGate,
    ServiceTokenAuth,
    take_service_token,
)
from core.runtime.model_source import missing_folder_problem
from core.runtime.parking import MemoryUse, ParkLevel, mount_park_routes

__all__ = ["BaseService", "Health", "MemoryUse", "ParkLevel"]  # Health lives in core/runtime/health.py

log = logging.getLogger(__name__)


class BaseService(ABC):
    """Subclass, implement ``load`` and ``add_routes``, call ``run()``."""

    # The service's kind ("flux"). Started by the orchestrator, run() replaces it with the models.yaml
    # entry's name (AIO_MODEL_NAME), so logs, /health and errors say which entry speaks: two entries
    # may run the same script.
    name: str = "service"
    default_port: ClassVar[int] = 8000
    default_model: ClassVar[str | None] = None  # --model when none is given (hub id or folder)
    # The packages the service's engine imports in load() (e.g. "diffusers"): ``--check-imports``
    # imports them without loading a model, so provisioning can prove an environment works.
    engine_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.options = argparse.Namespace()
        self.model_path: str | None = None
        self.health = Health.LOADING
        self.error: str | None = None
        self.max_concurrency: int | None = None
        self.vram_gb: float | None = None  # share of the GPU (GiB); None: the whole GPU
        self.service_token: str | None = None  # required as "Authorization: Bearer" when set
        self.parked_level: ParkLevel | None = None
        self._server: uvicorn.Server | None = None
        self._requests: ConcurrencyCap | None = None  # counts requests in progress; made by create_app()
        self._load_task: asyncio.Task[None] | None = None

    # -- what subclasses implement ------------------------------------------------------

    @abstractmethod
    async def load(self) -> None:
        """Load the model (``self.model_path``, ``self.options``). Heavy imports go here.

        Run blocking work (``from_pretrained``, moving weights) through ``asyncio.to_thread``:
        the event loop must stay free so ``/health`` can answer 503 while the model loads.
        """

    @abstractmethod
    def add_routes(self, app: FastAPI) -> None:
        """Add the service's HTTP routes to ``app``."""

    async def warmup(self) -> None:
        """Run once after ``load()`` before the service reports ready (e.g. one tiny request)."""

    async def unload(self) -> None:
        """Release the model on shutdown (free GPU memory, close engines)."""

    # -- parking (core/runtime/parking.py): a service that can park overrides offload and restore ------

    async def offload(self, level: ParkLevel) -> None:
        """Give the model's GPU memory back, keeping what ``restore()`` needs: at level 1 the
        weights in host memory, at level 2 nothing (restore reloads them from disk).

        Called with no request in progress; cached GPU blocks are released afterwards.
        """
        raise NotImplementedError  # unreachable: park_unsupported() says so first

    async def restore(self) -> None:
        """Bring a parked model back, serving exactly as before it was parked."""
        raise NotImplementedError

    async def after_restore(self) -> None:
        """Run after ``restore()`` before the service reports ready again (e.g. a one-token warm-up)."""

    def park_unsupported(self, level: ParkLevel | None = None) -> str | None:
        """Why this service cannot park (at ``level``), or None when it can."""
        if type(self).offload is BaseService.offload:
            return f"{self.name} does not implement parking"
        return None

    def memory_use(self) -> MemoryUse:
        """GPU memory the model holds now, and host memory kept for a restore (``/state``)."""
        return MemoryUse()

    def requests_in_progress(self) -> int:
        """Requests past the readiness gate that have not ended yet."""
        return 0 if self._requests is None else self._requests.active

    async def requests_drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for no request to be in progress; whether none is."""
        return True if self._requests is None else await self._requests.idle(timeout)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add service-specific command-line options (read them from ``self.options``)."""

    def required_modules(self) -> tuple[str, ...]:
        """What ``load()`` will import with these options (override when it depends on them)."""
        return self.engine_modules

    def check_imports(self) -> dict[str, Any]:
        """Import the engine's packages (no model is loaded); their versions, or the first failure."""
        import importlib
        import importlib.metadata

        found: dict[str, str] = {}
        for module in self.required_modules():
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a package that breaks while importing
                return {"service": self.name, "ok": False, "modules": found,
                        "error": f"import {module}: {type(exc).__name__}: {exc}"}
            top = module.split(".")[0]
            try:
                found[module] = importlib.metadata.version(top.replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                found[module] = "?"
        report: dict[str, Any] = {"service": self.name, "ok": True, "modules": found}
        if getattr(self.options, "device", None) is not None:  # a torch service: can it use its device?
            from core.runtime.devices import resolve_device

            try:
                report["device"] = resolve_device(self.options.device)
            except Exception as exc:
                report.update(ok=False, error=f"--device {self.options.device}: {exc}")
        return report

    # -- lifecycle ----------------------------------------------------------------------

    def fatal(self, reason: str) -> None:
        """Report an unrecoverable error: health turns 503 and the process exits non-zero."""
        log.error("%s: fatal: %s", self.name, reason)
        self.health, self.error = Health.FAILED, reason
        if self._server is not None:
            self._server.should_exit = True

    def failed(self) -> bool:
        """Whether fatal() was called: the service never serves again."""
        return self.health is Health.FAILED

    def not_ready_reason(self) -> str | None:
        if self.health is Health.READY:
            return None
        if self.health is Health.FAILED:
            return f"{self.name} failed: {self.error}"
        if self.health in (Health.PARKING, Health.PARKED, Health.RESTORING):
            return f"{self.name} is {self.health.value} (its GPU memory given back); the orchestrator restores it"
        return f"{self.name} is {self.health.value}"

    async def _load_and_warm(self) -> None:
        try:
            await self.load()
            if self.failed():  # load() called fatal(): no warm-up, never ready
                return
            await self.warmup()
            if self.failed():
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: loading failed", self.name)
            self.fatal(f"loading failed: {type(exc).__name__}: {exc}")
            return
        self.health = Health.READY
        log.info("%s: ready", self.name)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._load_task = asyncio.create_task(self._load_and_warm(), name=f"load:{self.name}")
        try:
            yield
        finally:
            if self.health is not Health.FAILED:
                self.health = Health.STOPPING
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task
            await self.unload()
            log.info("%s: stopped", self.name)

    # -- the app --------------------------------------------------------------------------

    def create_app(self) -> Any:
        """The ASGI app: FastAPI routes behind the service's middlewares."""
        app = FastAPI(title=self.name, lifespan=self.lifespan, docs_url="/docs", redoc_url=None)

        @app.get("/health")
        async def health() -> JSONResponse:
            body = {"status": self.health.value, "service": self.name, "model": self.model_path}
            if self.error:
                body["error"] = self.error
            return JSONResponse(body, 200 if self.health is Health.READY else 503)

        install_error_handlers(app, owner=self.name)
        mount_park_routes(app, self)
        self.add_routes(app)
        return self._guarded(app)

    def _guarded(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind the middlewares, outermost first: service token, readiness,
        concurrency cap (which also counts the requests in progress: a park waits for them), cancel on
        disconnect (core/runtime/middleware.py)."""
        limit = sys.maxsize if self.max_concurrency is None else self.max_concurrency
        self._requests = ConcurrencyCap(CancelOnDisconnect(app), limit)
        guarded: ASGIApp = ReadinessGate(self._requests, self.not_ready_reason)
        if self.service_token is not None:
            guarded = ServiceTokenAuth(guarded, self.service_token)
        return guarded

    # -- command line -------------------------------------------------------------------

    def argument_parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=f"{self.name} model service")
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=self.default_port, help="port to bind")
        parser.add_argument("--model", help="model path or hub id to load")
        parser.add_argument("--max-concurrency", type=int, help="requests at once; more get 429")
        parser.add_argument("--drain-timeout", type=float, default=30.0,
                            help="seconds in-flight requests get to finish after SIGTERM")
        parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        parser.add_argument("--check-imports", action="store_true",
                            help="import the engine's packages, print a JSON report and exit (no model is loaded)")
        parser.add_argument("--vram-gb", type=float, default=self._share_or_exit(parser),
                            help=f"this service's share of the GPU in GiB (default: ${VRAM_ENV}, which the "
                            "orchestrator sets from vram_gb; unset: the whole GPU)")
        self.add_arguments(parser)
        return parser

    def _exit_after_signal(self, signum: int, frame: object) -> None:
        raise SystemExit(1 if self.health is Health.FAILED else 0)

    @staticmethod
    def _share_or_exit(parser: argparse.ArgumentParser) -> float | None:
        try:
            return share_from_env()
        except ShareError as exc:
            parser.error(str(exc))  # exits 2 with the message: a bad AIO_VRAM_GB is a usage error

    def run(self, argv: list[str] | None = None) -> None:
        """Parse the command line, serve until SIGTERM/SIGINT; exit 1 after a fatal error."""
        self.service_token = take_service_token()  # before anything can start a child process
        unix_path = os.environ.pop(SERVICE_SOCKET_ENV, None)  # the child processes of an engine do not listen
        self.name = os.environ.get(MODEL_NAME_ENV) or self.name
        parser = self.argument_parser()
        self.options = parser.parse_args(argv)
        self.model_path = self.options.model or self.model_path or self.default_model
        script = getattr(sys.modules.get(type(self).__module__), "__file__", None)
        missing = missing_folder_problem(self.options.model, Path(script) if script else None)
        if missing:  # before anything loads: transformers would read the path as a hub id and say only that
            parser.error(missing)
        self.max_concurrency = self.options.max_concurrency
        self.vram_gb = self.options.vram_gb
        if self.options.check_imports:
            report = self.check_imports()
            print(json.dumps(report), flush=True)
            sys.exit(0 if report["ok"] else 1)
        configure_logging(self.options.log_level)
        config = uvicorn.Config(
            self.create_app(), host=self.options.host, port=self.options.port, log_config=None,
            access_log=False, lifespan="on", timeout_graceful_shutdown=max(1, int(self.options.drain_timeout)),
        )
        self._server = uvicorn.Server(config)
        # uvicorn drains on SIGTERM, then raises the signal again once it has stopped. By then the
        # requests and the model have been shut down cleanly, so end with this service's own status
        # (0, or 1 after a fatal error) instead of dying of the signal.
        signal.signal(signal.SIGTERM, self._exit_after_signal)
        try:
            self._server.run(sockets=listening_sockets(self.options.host, self.options.port, unix_path))
        finally:
            remove_socket(unix_path)
        if self.health is Health.FAILED or not self._server.started:
            sys.exit(1)


"""Spawn, health-check, stop and restart the per-model service processes. Mechanism only.

Which service to start or stop, and when, is decided elsewhere (the orchestrator's
scheduler); this module only carries the decisions out. ``ServiceManager`` holds one
``ManagedService`` per model of a config (core/supervision/managed_service.py: its process,
its state machine and every operation on it), the health client they share, the service
token of this run and the reaper that makes them die with the orchestrator. The rest of
the supervision machinery is in core/supervision/ (docs/architecture.md maps it).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

from core.common.contract import service_socket
from core.config.launch import resolve_python, service_argv
from core.config.schema import ModelSpec, OrchestratorConfig
from core.supervision.child_env import new_service_token, service_env
from core.supervision.log_capture import ServiceLog
from core.supervision.managed_service import ManagedService
from core.supervision.reaper import Reaper
from core.supervision.restart_policy import RestartPolicy
from core.supervision.start_errors import StartFailed

__all__ = ["ManagedService", "ServiceManager", "StartFailed"]  # the names the design and users import from here


class ServiceManager:
    """Every managed service of one config, the shared health client and the reaper."""

    def __init__(self, config: OrchestratorConfig, *, use_reaper: bool = True, socket_dir: Path | None = None) -> None:
        self.config = config
        self.socket_dir = socket_dir  # services listen on a unix socket there too (the nginx data plane's folder)
        self._health = httpx.AsyncClient(timeout=5.0, trust_env=False)
        self.reaper = Reaper() if use_reaper else None
        self.service_token = new_service_token()
        settings = config.settings
        self._policy = RestartPolicy(settings.restart_backoff, settings.restart_backoff_max, settings.restart_window,
                                     settings.failed_cooldown)
        self.services = {name: self._build(spec) for name, spec in config.models.items()}

    def launch_of(self, spec: ModelSpec) -> tuple[list[str], dict[str, str]]:
        """The command line and environment ``spec``'s process is started with."""
        python = resolve_python(spec.python, self.config.base_dir, sys.executable) or sys.executable
        socket = service_socket(self.socket_dir, spec.name) if self.socket_dir is not None else None
        return (service_argv(spec, python, self.config.base_dir),
                service_env(spec, self.service_token, passthrough=self.config.settings.env_passthrough, socket=socket))

    def add(self, spec: ModelSpec) -> ManagedService:
        """A service for a model a reload added (stopped until a request or a preload starts it)."""
        self.services[spec.name] = self._build(spec)
        return self.services[spec.name]

    def _build(self, spec: ModelSpec) -> ManagedService:
        settings = self.config.settings
        argv, env = self.launch_of(spec)
        service_log = ServiceLog(
            spec.name, self.config.log_dir() / f"{spec.name.replace('/', '_')}.log", settings.log_lines,
            max_bytes=int(settings.log_max_mb * 1024 * 1024), backups=settings.log_backups,
            max_followers=settings.limits.max_log_followers,
        )
        return ManagedService(
            spec, argv=argv, env=env, service_log=service_log, policy=self._policy, health=self._health,
            reaper=self.reaper, service_token=self.service_token, health_interval=settings.health_interval,
            health_failures=settings.health_failures,
        )

    def open(self) -> None:
        """Start the reaper, so services die with us even if we are SIGKILLed."""
        if self.reaper is not None:
            self.reaper.start()

    def __getitem__(self, name: str) -> ManagedService:
        return self.services[name]

    async def shutdown(self) -> None:
        """Stop every service in parallel, then release the reaper and the health client."""
        await asyncio.gather(*(svc.stop("shutdown") for svc in self.services.values()))
        if self.reaper is not None:
            self.reaper.close()
        await self._health.aclose()

    def log_of(self, name: str) -> ServiceLog:
        """The log (file and ring buffer) of service ``name``."""
        return self.services[name].log

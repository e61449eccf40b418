"""The data plane's control: keeps nginx's route table in step with the services and reports its requests.

* A fast-path model's service becoming READY, or leaving it, changes the table: nginx reloads it (changes
  that come together are applied in one reload). Until a reload has taken effect a request may still be
  sent the old way; both ways are safe: to a service that is gone nginx cannot connect, and route.js then
  hands the request to the orchestrator, which answers it as it would any request for that model.
* A config reload (or a key rotation) renders nginx's configuration anew and reloads it.
* nginx logs each fast-path request (JSON lines, dataplane/conf.py); they are read every second and
  counted in the orchestrator's metrics (requests, latency, first byte), so /metrics covers both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
from collections.abc import Callable

from core.common.contract import service_socket
from core.config.schema import OrchestratorConfig
from core.service_manager import ServiceManager
from core.supervision.service_state import ServiceState
from model_orchestrator import auth
from model_orchestrator.dataplane.conf import Paths, nginx_conf, table_json
from model_orchestrator.dataplane.nginx import Nginx, find_nginx, find_njs_module
from model_orchestrator.dataplane.policy import may_take_fast_path, route_table, upstreams
from model_orchestrator.metrics import Metrics

log = logging.getLogger(__name__)

_LOG_INTERVAL = 1.0  # seconds between reads of nginx's fast-path log


class DataPlane:
    """nginx in front of one orchestrator."""

    def __init__(self, config: OrchestratorConfig, manager: ServiceManager, paths: Paths,
                 keys: Callable[[], auth.Keys], metrics: Metrics) -> None:
        self.config = config
        self.manager = manager
        self.paths = paths
        self._keys = keys
        self._metrics = metrics
        self.nginx = Nginx(find_nginx(config.settings.data_plane.nginx), paths, manager.reaper)
        self.generation = 0
        self._dirty = asyncio.Event()
        self._conf = ""  # the configuration nginx was last given
        self._tasks: list[asyncio.Task[None]] = []
        self._log_offset = 0
        # Neither changes before a restart (settings.data_plane is restart-only): found once.
        self._njs_module = find_njs_module(config.settings.data_plane.njs_module)
        self._user = getpass.getuser() if os.geteuid() == 0 else None

    # -- what nginx is given ----------------------------------------------------------------

    def ready(self) -> list[str]:
        """The fast-path models that may be sent requests now: READY, and no reload is retiring them."""
        return [name for name, svc in self.manager.services.items()
                if svc.state is ServiceState.READY and not svc.retiring]

    def sockets(self) -> dict[str, str]:
        """The services that listen on a unix socket (ServiceManager.socket_dir): nginx connects to those there.
        A socket a stopped service left behind refuses connections, as its port would."""
        folder = self.manager.socket_dir
        found = {name: service_socket(folder, name) for name in self.config.models} if folder else {}
        return {name: str(path) for name, path in found.items() if path is not None and path.exists()}

    def conf(self) -> str:
        return nginx_conf(self.config.settings, upstreams(self.config, self.sockets()), self.paths,
                          self.manager.service_token, self._njs_module, self._user)

    def table(self) -> str:
        keys = self._keys()
        digests = [*keys.client, *keys.admin] if keys.configured else None
        return table_json(route_table(self.config, self.ready(), digests, self.generation), upstreams(self.config))

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.paths.fast_log.touch(mode=0o600)
        self._conf = self.conf()
        await self.nginx.start(self._conf, self.table(), self.generation)
        self._tasks = [asyncio.create_task(self._apply_changes(), name="data-plane-routes"),
                       asyncio.create_task(self._read_log(), name="data-plane-log")]
        log.info("data plane: nginx listens on %s:%s; fast path for %s", self.config.settings.host,
                 self.config.settings.port, ", ".join(up.model for up in upstreams(self.config)) or "no model "
                 "(none is pinned with ttl 0 and park.idle 0): every request goes through the orchestrator")

    async def stop(self, drain: float) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.nginx.stop(drain)
        self._count_log()  # what the last requests logged
        # Here, not after the server returns: uvicorn ends the process by re-raising the signal that stopped it.
        shutil.rmtree(self.paths.root, ignore_errors=True)

    def transitioned(self, name: str, old: ServiceState, new: ServiceState) -> None:
        """A service's state changed (ManagedService.on_transition)."""
        spec = self.config.models.get(name)
        if (old is ServiceState.READY) != (new is ServiceState.READY) and spec is not None and may_take_fast_path(spec):
            self._dirty.set()

    def use(self, config: OrchestratorConfig) -> None:
        """A config reload (or new keys): render everything anew."""
        self.config = config
        self._dirty.set()

    # -- carrying changes out ---------------------------------------------------------------

    async def _apply_changes(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.generation += 1
            # A service that became ready may listen on its socket now: the configuration is rendered anew
            # each time, and given to nginx (checked with nginx -t) when it changed.
            conf = self.conf()
            try:
                await self.nginx.reload(self.table(), self.generation, conf if conf != self._conf else None)
                self._conf = conf
            except Exception as exc:  # the orchestrator's path still serves every request
                log.error("data plane: reload failed (requests keep their previous routes): %s", exc)

    async def _read_log(self) -> None:
        while True:
            await asyncio.sleep(_LOG_INTERVAL)
            self._count_log()

    def _count_log(self) -> None:
        """Count the fast-path requests nginx logged since the last read."""
        with self.paths.fast_log.open("rb") as log_file:
            log_file.seek(self._log_offset)
            data = log_file.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line nginx is still writing waits for the next read
        self._log_offset += len(complete)
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
                first_byte = entry["first_byte"].rpartition(" ")[2]  # "-": no answer began
                self._metrics.answered(entry["model"], entry["route"], entry["status"],
                                       entry["type"].startswith("text/event-stream"), entry["seconds"],
                                       float(first_byte) if first_byte not in ("", "-") else None)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("data plane: unreadable line in nginx's log (%s): %r", exc, line[:200])

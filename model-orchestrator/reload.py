"""Reloading models.yaml on a running orchestrator: validate the new file, then apply it whole.

``POST /admin/reload``, SIGHUP (and ``settings.watch_config``) all come here. The file goes
through ``load_config``, the checks a start makes; an invalid one changes nothing, and the
answer says why, naming file, model and key. A valid one is applied in one synchronous step
(no request is routed between its parts): routing and aliases, keys, limits, defaults, budgets
and the fields each model reads live. Then, in the background, a model whose process must
change (reload_plan.PROCESS_FIELDS) or that was removed takes no new request ("retiring"), its
requests in flight finish, and it stops; a changed one starts with its new config on its next
request (queued requests wait for that), a removed one is forgotten and its queued requests get
404. Untouched models keep their process, state and queue. Settings only a restart can apply
are kept as they were and listed as refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.common.errors import ServiceError
from core.config.load import parse_config
from core.config.schema import ConfigError, OrchestratorConfig
from core.host.host_memory import resolve_host_budget
from core.service_manager import ManagedService
from model_orchestrator import auth
from model_orchestrator.reload_plan import ReloadPlan, config_hash, plan_reload
from model_orchestrator.routing import ModelIndex

if TYPE_CHECKING:
    from model_orchestrator.http_server import AccessGate
    from model_orchestrator.orchestrator import Runtime

log = logging.getLogger(__name__)


class Reloader:
    """Carries a reload out on one ``Runtime`` and the access gate in front of it."""

    def __init__(self, runtime: Runtime, gate: AccessGate, bind: str) -> None:
        self.runtime, self.gate, self._bind = runtime, gate, bind  # the address it listens on: keys may not go
        self._lock = asyncio.Lock()
        self._retiring: dict[str, asyncio.Task[None]] = {}  # model → its retirement under way
        self.on_result: Callable[[str], None] | None = None  # "applied", "unchanged", "invalid", "busy": metrics

    async def reload(self, cause: str) -> dict[str, Any]:
        """Apply the config file again; the answer lists what changed. ServiceError (with the file's problem,
        or what a previous reload still has under way) when nothing was applied."""
        async with self._lock:
            try:
                answer = self._reload(cause)
            except ServiceError as exc:
                self._count("busy" if exc.code == "reload_in_progress" else "invalid")
                log.warning("reload (%s) refused: %s", cause, exc.message)
                raise
            self._count("applied" if answer["applied"] else "unchanged")
            return answer

    def _reload(self, cause: str) -> dict[str, Any]:
        runtime = self.runtime
        source = runtime.config.source
        assert source is not None, "a running orchestrator's config has a file"
        pending = sorted(name for name, task in self._retiring.items() if not task.done())
        if pending:
            raise ServiceError(409, f"A previous reload is still restarting or removing {', '.join(pending)} "
                               "(waiting for their requests to finish); retry once they are done.",
                               "reload_in_progress", retry_after=5)
        try:
            text = source.read_bytes()
            new = parse_config(text.decode(), source)  # the bytes hashed are the bytes applied
            keys = auth.Keys.load(new)
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            raise ServiceError(400, f"The config was not reloaded, nothing changed: {exc}", "invalid_config") \
                from None
        plan = plan_reload(runtime.config, new)
        refused = dict(plan.refused)
        problem = auth.exposure_problem(self._bind, keys, runtime.config.settings)  # allow_unauthenticated: as started
        if problem is not None:
            refused["keys"] = f"kept as they were: with the new ones, {problem}"
            keys = self.gate.keys
        effective = with_settings_of(new, runtime.config, refused)
        self._apply(effective, plan, keys)
        runtime.loaded = Loaded(config_hash(text), time.time(), cause)
        log.info("reload (%s): %s", cause, plan.summary())
        return {"applied": plan.changes_anything, "config": str(source), "hash": runtime.loaded.hash,
                **plan.summary(), "refused": refused}

    def _apply(self, config: OrchestratorConfig, plan: ReloadPlan, keys: auth.Keys) -> None:
        """The whole change, with no await in it: no request sees a part of it."""
        runtime, coordinator = self.runtime, self.runtime.coordinator
        runtime.config = runtime.manager.config = config
        runtime.index = ModelIndex(config)
        runtime.proxy.use(runtime.index, config.settings)
        self.gate.keys = keys
        if runtime.request_cap is not None:
            runtime.request_cap.resize(config.settings.limits.max_requests)
        host_budget = resolve_host_budget(config.settings.host_memory_gb, config.settings.host_memory_reserve_gb)
        coordinator.use_settings(config.settings, host_budget)
        runtime.rebudget()
        for name in plan.live:
            runtime.manager[name].update_spec(config.models[name])
        for name in plan.added:
            runtime.adopt(runtime.manager.add(config.models[name]))
        for name in plan.restarted:
            self._retire(runtime.manager[name], "restarted by a reload", lambda svc: self._relaunch(svc, config))
        for name in plan.removed:
            self._retire(runtime.manager[name], "removed by a reload", self._forget)
        coordinator.notify()
        for name in plan.added:
            if config.models[name].preload:
                runtime.background(coordinator.preload_one(name), f"preload-{name}")

    def _retire(self, svc: ManagedService, reason: str, then: Callable[[ManagedService], None]) -> None:
        svc.retiring = True
        self._retiring[svc.name] = self.runtime.background(self._retirement(svc, reason, then), f"retire-{svc.name}")

    async def _retirement(self, svc: ManagedService, reason: str, then: Callable[[ManagedService], None]) -> None:
        coordinator = self.runtime.coordinator
        try:
            await coordinator.until_idle(svc)  # its requests in flight finish; none is admitted meanwhile
            await svc.stop(reason)
            then(svc)
        finally:
            svc.retiring = False
            coordinator.notify()

    def _relaunch(self, svc: ManagedService, config: OrchestratorConfig) -> None:
        spec = config.models[svc.name]
        svc.relaunch_with(spec, *self.runtime.manager.launch_of(spec))
        self.runtime.coordinator.replace_want(spec)
        log.info("%s: stopped for its new config; it starts with it on its next request", svc.name)

    def _forget(self, svc: ManagedService) -> None:
        self.runtime.manager.services.pop(svc.name, None)
        self.runtime.coordinator.forget(svc.name)
        log.info("%s: removed by a reload", svc.name)

    def _count(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)


class ConfigWatch:
    """``settings.watch_config``: the file is looked at every ``interval`` seconds (a stat; read only when that
    changed) and reloaded once it has stayed the same for one more look with bytes other than those loaded.
    The flag is read at each look, so a reload can turn the watch on or off."""

    def __init__(self, reloader: Reloader, interval: float = 1.0) -> None:
        self._reloader, self._interval = reloader, interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="config-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        runtime = self._reloader.runtime
        seen = settled = _stat(runtime.config.source)
        while True:
            await asyncio.sleep(self._interval)
            now = _stat(runtime.config.source)
            if now != seen:  # still being written: look again once it is still
                seen = now
                continue
            if now == settled or not runtime.config.settings.watch_config:
                settled = now
                continue
            settled = now
            source = runtime.config.source
            if source is not None and config_hash(file_bytes(source)) != runtime.loaded.hash:
                with contextlib.suppress(ServiceError):  # refused: logged and counted by the reloader
                    await self._reloader.reload("file watch")


def _stat(path: Path | None) -> tuple[float, int] | None:
    try:
        found = path.stat() if path is not None else None
    except OSError:
        return None
    return (found.st_mtime, found.st_size) if found is not None else None


def file_bytes(path: Path | None) -> bytes:
    """A file's bytes, or none when it cannot be read (a config built in memory has no file)."""
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError:
        return b""


class Loaded:
    """Which config the orchestrator serves: its hash, when it was loaded, and why."""

    def __init__(self, hash: str, at: float, cause: str) -> None:
        self.hash, self.at, self.cause = hash, at, cause

    def entry(self) -> dict[str, Any]:
        return {"hash": self.hash, "loaded_at": self.at, "cause": self.cause}


def with_settings_of(new: OrchestratorConfig, old: OrchestratorConfig, refused: Mapping[str, str]
                     ) -> OrchestratorConfig:
    """``new`` with each refused setting (``port``, ``limits.max_connections``) as it is in ``old``."""
    kept: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for key in refused:
        outer, _, inner = key.partition(".")
        if inner:
            limits[inner] = getattr(old.settings.limits, inner)
        elif outer in type(old.settings).model_fields:
            kept[outer] = getattr(old.settings, outer)
    if limits:
        kept["limits"] = new.settings.limits.model_copy(update=limits)
    if not kept:
        return new
    effective = new.model_copy(update={"settings": new.settings.model_copy(update=kept)})
    effective._source, effective._base_dir = new.source, old.base_dir if "base_dir" in refused else new.base_dir
    return effective

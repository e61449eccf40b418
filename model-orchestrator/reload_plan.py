"""What a reload of models.yaml changes, model by model and setting by setting. Pure; no I/O.

``plan_reload(old, new)`` compares two validated configs and says, for the reload to carry out
(reload.py), which models are added, removed, restarted (a field the running process was started
with changed: it finishes its requests and starts anew on its next one), changed live (the rest:
routing, timers, caps, park settings), or untouched; which settings apply live; and which are
refused, because only a restart of the orchestrator can apply them (the address it listens on,
the folders it writes to, the HTTP server's own bounds).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from core.config.reloadable import PROCESS_FIELDS, RESTART_SETTINGS
from core.config.schema import OrchestratorConfig


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    restarted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # model → the process fields changed
    live: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # model → the fields changed, applied live
    unchanged: tuple[str, ...] = ()
    settings_live: tuple[str, ...] = ()  # dotted names of the settings applied live
    refused: Mapping[str, str] = field(default_factory=dict)  # setting → why only a restart applies it

    @property
    def changes_anything(self) -> bool:
        return bool(self.added or self.removed or self.restarted or self.live or self.settings_live)

    def summary(self) -> dict[str, Any]:
        """The answer's and the log's account of it."""
        return {"added": list(self.added), "removed": list(self.removed),
                "restarted": {name: list(fields) for name, fields in self.restarted.items()},
                "changed_live": {name: list(fields) for name, fields in self.live.items()},
                "unchanged": list(self.unchanged), "settings_changed_live": list(self.settings_live),
                "refused": dict(self.refused)}


def plan_reload(old: OrchestratorConfig, new: OrchestratorConfig) -> ReloadPlan:
    restarted: dict[str, tuple[str, ...]] = {}
    live: dict[str, tuple[str, ...]] = {}
    unchanged: list[str] = []
    for name in old.models.keys() & new.models.keys():
        changed = changed_fields(old.models[name], new.models[name])
        process = tuple(f for f in changed if f in PROCESS_FIELDS)
        if process:
            restarted[name] = process
        elif changed:
            live[name] = changed
        else:
            unchanged.append(name)
    settings = changed_fields(old.settings, new.settings, nested=True)
    if old.base_dir != new.base_dir and "base_dir" not in settings:  # the file moved: base_dir is relative to it
        settings = (*settings, "base_dir")
    refused = {key: f"needs a restart of the orchestrator ({RESTART_SETTINGS[key]})"
               for key in settings if key in RESTART_SETTINGS}
    return ReloadPlan(
        added=tuple(n for n in new.models if n not in old.models),
        removed=tuple(n for n in old.models if n not in new.models),
        restarted=_ordered(restarted, new.models), live=_ordered(live, new.models),
        unchanged=tuple(n for n in new.models if n in unchanged),
        settings_live=tuple(key for key in settings if key not in refused), refused=refused,
    )


def changed_fields(old: BaseModel, new: BaseModel, nested: bool = False) -> tuple[str, ...]:
    """The fields whose values differ, in declaration order; with ``nested``, a sub-model's as ``outer.inner``
    (so one limit, not all of ``limits``, is named)."""
    found: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if nested and isinstance(before, BaseModel) and isinstance(after, BaseModel) and name == "limits":
            found += [f"{name}.{inner}" for inner in changed_fields(before, after)]
        else:
            found.append(name)
    return tuple(found)


def _ordered(by_model: dict[str, tuple[str, ...]], order: Iterable[str]) -> dict[str, tuple[str, ...]]:
    return {name: by_model[name] for name in order if name in by_model}


def config_hash(text: bytes) -> str:
    """A short fingerprint of a config file's bytes, for /status and the dashboard."""
    return hashlib.sha256(text).hexdigest()[:12]

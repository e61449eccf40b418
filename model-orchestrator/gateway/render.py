"""The gateway's config, rendered from a fleet description: LiteLLM's ``config.yaml`` and ``fleet.json``.

    python -m model_orchestrator.gateway.render gateway.yaml --out /etc/aio-gateway

``gateway.yaml`` names the pods (id, URL, the models each serves or the models.yaml it runs, and
the environment variables holding its keys). The output: one LiteLLM deployment per (pod, model
name or alias), all sent through the affinity plug-in (plugin.py); LiteLLM's retries, cooldowns and
master key; its background health checks off (they send real requests, which would load models);
timeouts above the slowest cold load. ``fleet.json`` tells the plug-in where each pod's state is.
Keys stay in the environment: the files only name variables (``os.environ/NAME``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PLUGIN = "model_orchestrator.gateway.plugin.affinity"
AUTH = "model_orchestrator.gateway.auth.user_api_key_auth"  # client keys and the master key (auth.py)


class Pod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The pod's name in the gateway.")
    url: str = Field(pattern=r"^https?://", description="The pod's orchestrator, e.g. http://pod-a:9000.")
    models: list[str] | None = Field(None, description="The model names (and aliases) it serves.")
    models_config: Path | None = Field(None, description="Or the models.yaml it runs: names and aliases are read.")
    key_env: str | None = Field(None, description="Variable with a client key of the pod (requests).")
    state_key_env: str | None = Field(None, description="Variable with a fleet key of the pod (/fleet/state).")

    @model_validator(mode="after")
    def _one_model_source(self) -> Pod:
        if (self.models is None) == (self.models_config is None):
            raise ValueError(f"pod {self.id!r}: give exactly one of `models` and `models_config`")
        return self


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    master_key_env: str = Field("LITELLM_MASTER_KEY", description="Variable with the gateway's own key.")
    timeout_s: float = Field(900, gt=0, description="Per request, above the slowest cold load of any model.")
    num_retries: int = Field(2, ge=0, description="Retries on another pod after a pod failed (not timeouts).")
    allowed_fails: int = Field(3, ge=0, description="Failures a minute before a deployment cools down.")
    cooldown_s: float = Field(10, ge=0, description="How long a failing deployment is left out.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the plug-in reads each pod's state.")
    poll_timeout_s: float = Field(0.5, gt=0, description="How long it waits for one pod's state.")


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pods: list[Pod] = Field(min_length=1)
    settings: GatewaySettings = Field(default_factory=GatewaySettings)

    @model_validator(mode="after")
    def _unique_ids(self) -> GatewayConfig:
        ids = [pod.id for pod in self.pods]
        if len(set(ids)) != len(ids):
            raise ValueError(f"pod ids must be unique: {ids}")
        return self


def served_names(pod: Pod, base: Path) -> dict[str, str]:
    """Every name a client may use for the pod's models → the model's own name."""
    if pod.models_config is None:
        return {name: name for name in pod.models or ()}
    path = pod.models_config if pod.models_config.is_absolute() else base / pod.models_config
    models = (yaml.safe_load(path.read_text()) or {}).get("models") or {}
    names = {}
    for name, spec in models.items():
        for alias in [name, *((spec or {}).get("aliases") or [])]:
            names[str(alias)] = str(name)
    return names


def litellm_config(config: GatewayConfig, base: Path) -> dict[str, Any]:
    s = config.settings
    deployments = []
    for pod in config.pods:
        key = f"os.environ/{pod.key_env}" if pod.key_env else "none"
        for name, model in sorted(served_names(pod, base).items()):
            deployments.append({
                "model_name": name,
                "litellm_params": {"model": f"openai/{name}", "api_base": pod.url.rstrip("/") + "/v1",
                                   "api_key": key, "timeout": s.timeout_s, "stream_timeout": s.timeout_s},
                "model_info": {"id": f"{pod.id}/{name}", "pod": pod.id, "aio_model": model},
            })
    return {
        "model_list": deployments,
        "litellm_settings": {"callbacks": [PLUGIN, "prometheus"], "request_timeout": s.timeout_s},
        "router_settings": {
            "num_retries": s.num_retries, "allowed_fails": s.allowed_fails, "cooldown_time": s.cooldown_s,
            "timeout": s.timeout_s, "stream_timeout": s.timeout_s,
            # A timeout means a slow cold load, not a dead pod: a retry would load the model twice.
            "retry_policy": {"TimeoutErrorRetries": 0, "BadRequestErrorRetries": 0,
                             "AuthenticationErrorRetries": 0, "NotFoundErrorRetries": 0},
        },
        "general_settings": {"master_key": f"os.environ/{s.master_key_env}", "custom_auth": AUTH,
                             "background_health_checks": False},
    }


def fleet_file(config: GatewayConfig) -> dict[str, Any]:
    return {"poll_interval_s": config.settings.poll_interval_s, "poll_timeout_s": config.settings.poll_timeout_s,
            "pods": [{"pod": pod.id, "state_url": pod.url.rstrip("/") + "/fleet/state", "key_env": pod.state_key_env}
                     for pod in config.pods]}


def load(path: Path) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'gateway'}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"{path}: {problems}") from None


def write(config: GatewayConfig, base: Path, out: Path) -> list[tuple[Path, bool]]:
    """Write both files into ``out``; each with whether it changed (an unchanged file is not rewritten,
    so the playbook's re-run reports no change and restarts nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {out / "config.yaml": "# Rendered by model_orchestrator.gateway.render: edit the fleet file, not this.\n"
             + yaml.safe_dump(litellm_config(config, base), sort_keys=False),
             out / "fleet.json": json.dumps(fleet_file(config), indent=2) + "\n"}
    written = []
    for path, text in texts.items():
        changed = not path.exists() or path.read_text() != text
        if changed:
            path.write_text(text)
        written.append((path, changed))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_orchestrator.gateway.render", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fleet", type=Path, help="the fleet description (see docs/DEPLOYMENT.md)")
    parser.add_argument("--out", type=Path, required=True, help="folder for config.yaml and fleet.json")
    parser.add_argument("--base", type=Path, help="folder that relative models_config paths start from "
                        "(default: the fleet file's)")
    args = parser.parse_args(argv)
    config = load(args.fleet)
    for path, changed in write(config, (args.base or args.fleet.resolve().parent).resolve(), args.out):
        print(f"{'wrote' if changed else 'unchanged'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

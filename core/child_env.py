"""What a model service process is given: its environment and its per-run service token.

Children get an allowlisted environment plus what ``models.yaml`` gives them (a model's
``env``, ``settings.env_passthrough``), never the orchestrator's whole environment: API
keys and hub tokens stay in the process that needs them.

The service token is a random secret made once per orchestrator run. Services require it
(``Authorization: Bearer``) on every route but ``/health``, and the proxy sends it instead
of the client's own key, so a peer that can reach a service's port directly (a tailnet in
userspace networking mode, another local user) cannot use the service.
"""

from __future__ import annotations

import os
import secrets

from core import repo_pythonpath
from core.config import ModelSpec
from core.memory_share import VRAM_ENV

SERVICE_TOKEN_ENV = "AIO_SERVICE_TOKEN"


def new_service_token() -> str:
    return secrets.token_urlsafe(32)


def service_env(spec: ModelSpec, token: str | None = None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, the spec's additions, unbuffered output, `core` importable,
    and its GPU share (``vram_gb``) for the engines to keep to (see core/memory_share.py)."""
    env = {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1", **spec.env}
    env.pop(VRAM_ENV, None)  # never inherit another model's share
    env.pop(SERVICE_TOKEN_ENV, None)
    if spec.vram_gb is not None:  # 0 too: a service told it has no GPU share refuses to use the GPU
        env[VRAM_ENV] = f"{spec.vram_gb:g}"
    if spec.service_script is not None:
        env["PYTHONPATH"] = repo_pythonpath(env.get("PYTHONPATH"))
    if token is not None:
        env[SERVICE_TOKEN_ENV] = token
    return env

"""Who may use the gateway: LiteLLM's ``custom_auth`` hook, so that the gateway keeps the pods' two scopes.

* client keys (``AIO_GATEWAY_KEYS``, comma-separated): the OpenAI-compatible routes in CLIENT_ROUTES,
  matched exactly on the decoded path (so ``/v1/../key/generate`` or ``/%6bey/generate`` is not one);
* the master key (``general_settings.master_key``): everything, LiteLLM's admin routes and /metrics too.

Anything else is 401: no key, or a key that is neither. Without this hook LiteLLM answers a key it does
not know with 400 "No connected db." (it looks for virtual keys in a database that this setup has
not), and has no client scope short of that database. Keys are compared in constant time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from model_orchestrator.auth import Keys, read_keys

KEYS_ENV = "AIO_GATEWAY_KEYS"
# The routes a client key reaches (OpenAI's paths, with and without /v1, as LiteLLM serves them).
CLIENT_ROUTES = frozenset(prefix + path for prefix in ("", "/v1") for path in (
    "/chat/completions", "/completions", "/embeddings", "/models", "/images/generations",
    "/audio/speech", "/audio/transcriptions", "/responses", "/rerank", "/messages"))


@lru_cache(maxsize=4)
def _keys(master: str, clients: tuple[str, ...]) -> Keys:
    return Keys.of(clients, [master] if master else [])


def scope_of(key: str, master: str | None, clients: list[str]) -> str | None:
    """"admin", "client" or None, compared as a pod compares its keys (model_orchestrator.auth.Keys: hashed,
    then every known key in constant time)."""
    scope = _keys(master or "", tuple(clients)).scope_of(key)
    return None if scope is None else scope.value


def client_keys(environ: Mapping[str, str] = os.environ) -> list[str]:
    return read_keys(KEYS_ENV, environ)


def refusal(scope: str | None, path: str) -> tuple[int, str] | None:
    """(status, message) when a key of ``scope`` may not reach ``path``; None when it may."""
    if scope is None:
        return 401, "Invalid or missing API key. Send 'Authorization: Bearer <key>'."
    if scope == "client" and path not in CLIENT_ROUTES:
        return 403, f"A client key does not reach {path}: it needs the gateway's master key."
    return None


async def user_api_key_auth(request: Any, api_key: str) -> Any:
    # LiteLLM lives in the gateway's own environment: imported here, so the rules above test without it.
    from litellm.proxy import proxy_server  # the master key LiteLLM read from its config
    from litellm.proxy._types import LitellmUserRoles, ProxyException, UserAPIKeyAuth

    scope = scope_of(api_key or "", proxy_server.master_key, client_keys())
    refused = refusal(scope, request.url.path)
    if refused is not None:
        raise ProxyException(message=refused[1], type="auth_error", param=None, code=refused[0])
    role = LitellmUserRoles.PROXY_ADMIN if scope == "admin" else LitellmUserRoles.INTERNAL_USER
    return UserAPIKeyAuth(api_key=api_key, user_role=role)

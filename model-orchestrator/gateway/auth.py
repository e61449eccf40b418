"""Who may use the gateway: LiteLLM's ``custom_auth`` hook, so that the gateway keeps the pods' two scopes.

* client keys (``AIO_GATEWAY_KEYS``, comma-separated): the OpenAI-compatible routes in CLIENT_ROUTES,
  matched exactly on the decoded path (so ``/v1/../key/generate`` or ``/%6bey/generate`` is not one);
* the master key (``general_settings.master_key``): everything, LiteLLM's admin routes and /metrics too.

Anything else is 401: no key, or a key that is neither. Without this hook LiteLLM answers a key it does
not know with 400 "No connected db." (it looks for virtual keys in a database that this setup has
not), and has no client scope short of that database. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

KEYS_ENV = "AIO_GATEWAY_KEYS"
# The routes a client key reaches (OpenAI's paths, with and without /v1, as LiteLLM serves them).
CLIENT_ROUTES = frozenset(prefix + path for prefix in ("", "/v1") for path in (
    "/chat/completions", "/completions", "/embeddings", "/models", "/images/generations",
    "/audio/speech", "/audio/transcriptions", "/responses", "/rerank", "/messages"))


def _is(key: str, known: str) -> bool:
    return bool(known) and hmac.compare_digest(key.encode(), known.encode())


def scope_of(key: str, master: str | None, clients: list[str]) -> str | None:
    """"admin", "client" or None; every known key is compared, so the time says nothing of which."""
    is_admin = _is(key, master or "")
    is_client = any([_is(key, known) for known in clients])
    return "admin" if is_admin else "client" if is_client else None


def client_keys(environ: Any = os.environ) -> list[str]:
    return [key.strip() for key in environ.get(KEYS_ENV, "").split(",") if key.strip()]


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

"""Who may call what. Policy only: pure functions of the request's method, path and headers.

Four scopes:

* public: ``/health``, which says only that the orchestrator is up, and the dashboard's static
  files (``/``, ``/ui/...``: no data; the page calls the admin routes with the key typed in);
* client: the OpenAI and Anthropic routes (``POST /v1/...``, ``GET /v1/models``, a stored response's
  ``GET /v1/responses/{id}``) and the model routes outside /v1 (``POST /rerank``, ``/v2/rerank``,
  ``/tokenize``, ``/detokenize``: routing.ROOT_ROUTES); client or admin keys, sent as ``Authorization:
  Bearer`` or as Anthropic's ``x-api-key``;
* fleet: ``GET /fleet/state``, what a gateway in front of several pods ranks them by (pod_state.py);
  fleet or admin keys. A fleet key reaches nothing else, so a gateway holds no pod's admin key;
* admin: everything else (``/admin``, ``/logs``, ``/upstream``, ``/status``, ``/metrics``,
  ``/docs``, ``/openapi.json``); admin keys only.

With no key configured at all every route is open, which ``exposure_problem`` allows only
on a loopback address (or when ``settings.allow_unauthenticated`` says so explicitly).

Admin routes also refuse what a web page could send: a request a browser marks as coming
from another site (``Origin`` not matching ``Host``, ``Sec-Fetch-Site: cross-site``), and,
when the orchestrator listens on loopback, a ``Host`` that is not a loopback name (DNS
rebinding: evil.example resolving to 127.0.0.1 so a page can read ``/logs``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.common.errors import ServiceError
from core.config.schema import OrchestratorConfig, Settings

log = logging.getLogger(__name__)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class Access(enum.Enum):
    PUBLIC = "public"
    CLIENT = "client"
    FLEET = "fleet"
    ADMIN = "admin"


def route_access(method: str, path: str) -> Access:
    """The scope a request needs. Unknown paths are client scope, so a client gets its 404."""
    if path in ("/health", "/", "/ui") or (method == "GET" and path.startswith("/ui/")):
        return Access.PUBLIC
    if path.startswith("/v1/") and (method == "POST" or path == "/v1/models"
                                    or path.startswith(("/v1/models/", "/v1/responses/"))):
        return Access.CLIENT
    if path == "/fleet/state" and method == "GET":
        return Access.FLEET
    if path.startswith(("/admin/", "/logs/", "/upstream/", "/fleet/")) or path in ("/status", "/metrics", "/docs",
                                                                        "/openapi.json", "/docs/oauth2-redirect"):
        return Access.ADMIN
    return Access.CLIENT


def _digest(key: str) -> bytes:
    # Compare fixed-length digests: compare_digest is constant-time only for equal lengths,
    # and hashing first keeps a key's length from leaking through timing too.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Keys:
    client: frozenset[bytes]
    admin: frozenset[bytes]
    fleet: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, client: Iterable[str], admin: Iterable[str], fleet: Iterable[str] = ()) -> Keys:
        return cls(frozenset(map(_digest, client)), frozenset(map(_digest, admin)), frozenset(map(_digest, fleet)))

    @classmethod
    def from_env(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Keys:
        env = os.environ if environ is None else environ
        return cls.of(read_keys(settings.api_key_env, env), read_keys(settings.admin_key_env, env),
                      read_keys(settings.fleet_key_env, env))

    @classmethod
    def load(cls, config: OrchestratorConfig, environ: Mapping[str, str] | None = None) -> Keys:
        """The keys a config names: its variables' and its key files' (read now: a reload reads them again).
        OSError when a key file cannot be read."""
        env = os.environ if environ is None else environ
        settings = config.settings
        files = [read_key_file(config.resolve_path(name)) if name else []
                 for name in (settings.api_keys_file, settings.admin_keys_file)]
        return cls.of([*read_keys(settings.api_key_env, env), *files[0]],
                      [*read_keys(settings.admin_key_env, env), *files[1]], read_keys(settings.fleet_key_env, env))

    @property
    def configured(self) -> bool:
        return bool(self.client or self.admin or self.fleet)

    def scope_of(self, token: str) -> Access | None:
        """ADMIN, CLIENT or FLEET for a known key, None otherwise; every key is compared (constant time)."""
        digest = _digest(token)
        is_admin = _matches(digest, self.admin)
        is_client = _matches(digest, self.client)
        is_fleet = _matches(digest, self.fleet)
        return Access.ADMIN if is_admin else Access.CLIENT if is_client else Access.FLEET if is_fleet else None


def _matches(digest: bytes, known: frozenset[bytes]) -> bool:
    found = False
    for candidate in known:
        found |= hmac.compare_digest(digest, candidate)
    return found


def read_keys(env_name: str | None, environ: Mapping[str, str]) -> list[str]:
    """Comma-separated keys from the variable ``env_name`` (none if unset or empty)."""
    if not env_name:
        return []
    return [key.strip() for key in environ.get(env_name, "").split(",") if key.strip()]


def read_key_file(path: Path) -> list[str]:
    """The keys in a key file: one per line or comma-separated; blank lines and ``#`` comments skipped."""
    lines = (line.partition("#")[0] for line in path.read_text().splitlines())
    return [key.strip() for line in lines for key in line.split(",") if key.strip()]


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>`` (OpenAI's clients), else ``x-api-key:
    <key>`` (Anthropic's). Either is checked the same way; neither reaches a service (proxy.py drops both)."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
        if name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


def check_access(keys: Keys, needed: Access, headers: list[tuple[bytes, bytes]]) -> ServiceError | None:
    """None if the request may go on, else the 401/403 to answer."""
    if needed is Access.PUBLIC or not keys.configured:
        return None
    token = presented_key(headers)
    scope = keys.scope_of(token) if token else None
    if scope is None:
        return ServiceError(401, "Missing or invalid API key (Authorization: Bearer ..., or x-api-key: ...).",
                            "invalid_api_key")
    if scope is Access.ADMIN or scope is needed:
        return None
    if needed is Access.FLEET:
        return ServiceError(403, "GET /fleet/state needs a fleet key (settings.fleet_key_env) or an admin key.",
                            "fleet_key_required")
    if scope is Access.FLEET:
        return ServiceError(403, "A fleet key reaches GET /fleet/state only.", "fleet_key_only")
    return ServiceError(403, "This route needs an admin key (settings.admin_key_env); a client key only "
                        "reaches the OpenAI routes.", "admin_key_required")


def cross_site_problem(headers: list[tuple[bytes, bytes]], loopback_bind: bool) -> ServiceError | None:
    """A 403 for an admin request a web page could have sent, else None."""
    found = {name: value.decode("latin-1") for name, value in headers
             if name in (b"host", b"origin", b"sec-fetch-site")}
    host = found.get(b"host", "")
    if loopback_bind and host and not is_loopback_host(_hostname(host)):
        return ServiceError(403, f"Host {host!r} is not a loopback name; admin routes of an orchestrator "
                            "listening on loopback answer only to localhost.", "forbidden_host")
    if found.get(b"sec-fetch-site") in ("cross-site", "same-site"):
        return ServiceError(403, "Cross-site requests to admin routes are refused.", "cross_site_request")
    origin = found.get(b"origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return ServiceError(403, f"Origin {origin!r} does not match this server; cross-site requests to admin "
                            "routes are refused.", "cross_site_request")
    return None


def _hostname(host_header: str) -> str:
    return urlsplit("//" + host_header).hostname or ""


def is_loopback_host(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, keys: Keys, settings: Settings) -> str | None:
    """Why the orchestrator must not start on ``host`` with ``keys``, or None if it may."""
    if keys.configured or settings.allow_unauthenticated or is_loopback_host(host):
        return None
    client, admin = settings.api_key_env or "AIO_API_KEYS", settings.admin_key_env or "AIO_ADMIN_KEYS"
    return (f"refusing to listen on {host} with no API key: anyone who can reach this port could use every "
            f"model and every admin route. Set {client} (client keys) and {admin} (admin keys), e.g. "
            f"`export {client}=$(openssl rand -hex 24)`, or listen on 127.0.0.1, or set "
            "settings.allow_unauthenticated: true to serve openly on purpose.")


def startup_warnings(host: str, keys: Keys, settings: Settings) -> list[str]:
    """What an operator should know about the access set-up (logged at start)."""
    if not keys.configured:
        where = "anyone on this machine" if is_loopback_host(host) else f"anyone who can reach {host}"
        return [f"no API key configured: {where} can use every route, admin routes included"]
    if not keys.admin:
        return [f"no admin key configured ({settings.admin_key_env}): /admin, /logs, /status and /upstream "
                "are closed"]
    return []

"""Access policy: which scope each route needs, key checks, cross-site guards, exposure refusal."""

from __future__ import annotations

import pytest

from core.config.schema import Settings
from model_orchestrator.auth import (
    Access,
    Keys,
    check_access,
    cross_site_problem,
    exposure_problem,
    is_loopback_host,
    read_keys,
    route_access,
    startup_warnings,
)

KEYS = Keys.of(["client-1", "client-2"], ["admin-1"], ["fleet-1"])


@pytest.mark.parametrize(("method", "path", "needed"), [
    ("GET", "/health", Access.PUBLIC),
    ("POST", "/v1/chat/completions", Access.CLIENT),
    ("POST", "/v1/images/generations", Access.CLIENT),
    ("GET", "/v1/models", Access.CLIENT),
    ("GET", "/v1/models/org/qwen", Access.CLIENT),
    ("POST", "/rerank", Access.CLIENT),  # Jina's and Cohere's rerank paths (routing.ROOT_ROUTES)
    ("POST", "/v2/rerank", Access.CLIENT),
    ("POST", "/v1/messages", Access.CLIENT),
    ("GET", "/v1/responses/resp_1", Access.CLIENT),  # a stored response (stored_responses.py)
    ("POST", "/v1/responses/resp_1/cancel", Access.CLIENT),
    ("POST", "/tokenize", Access.CLIENT),
    ("GET", "/nowhere", Access.CLIENT),  # a client gets its 404; no key gets 401
    ("GET", "/status", Access.ADMIN),
    ("GET", "/fleet/state", Access.FLEET),
    ("POST", "/fleet/state", Access.ADMIN),
    ("GET", "/fleet/state/", Access.ADMIN),
    ("GET", "/logs/qwen", Access.ADMIN),
    ("POST", "/admin/models/qwen/unload", Access.ADMIN),
    ("GET", "/upstream/qwen/health", Access.ADMIN),
    ("POST", "/upstream/qwen/v1/chat/completions", Access.ADMIN),
    ("GET", "/docs", Access.ADMIN),
    ("GET", "/openapi.json", Access.ADMIN),
])
def test_route_access(method: str, path: str, needed: Access) -> None:
    assert route_access(method, path) is needed


def auth(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


def test_client_key_reaches_client_routes_only() -> None:
    assert check_access(KEYS, Access.CLIENT, auth("client-2")) is None
    denied = check_access(KEYS, Access.ADMIN, auth("client-2"))
    assert denied is not None and (denied.status, denied.code) == (403, "admin_key_required")


def test_admin_key_reaches_everything() -> None:
    assert check_access(KEYS, Access.CLIENT, auth("admin-1")) is None
    assert check_access(KEYS, Access.ADMIN, auth("admin-1")) is None
    assert check_access(KEYS, Access.FLEET, auth("admin-1")) is None


def test_a_fleet_key_reaches_the_fleet_state_only() -> None:
    assert check_access(KEYS, Access.FLEET, auth("fleet-1")) is None
    for needed in (Access.CLIENT, Access.ADMIN):
        denied = check_access(KEYS, needed, auth("fleet-1"))
        assert denied is not None and (denied.status, denied.code) == (403, "fleet_key_only")
    denied = check_access(KEYS, Access.FLEET, auth("client-1"))
    assert denied is not None and (denied.status, denied.code) == (403, "fleet_key_required")
    assert Keys.of([], [], ["fleet-1"]).configured  # a fleet key alone still closes every other route


@pytest.mark.parametrize("headers", [
    [], auth("nope"), auth(""), auth("client-1x"), [(b"authorization", b"Basic client-1")],
])
def test_missing_or_wrong_key_is_401(headers: list[tuple[bytes, bytes]]) -> None:
    denied = check_access(KEYS, Access.CLIENT, headers)
    assert denied is not None and (denied.status, denied.code) == (401, "invalid_api_key")


def test_anthropics_x_api_key_is_a_key_like_a_bearer_token() -> None:
    # Anthropic's client sends its key as x-api-key; Authorization, when present, is the one that counts.
    assert check_access(KEYS, Access.CLIENT, [(b"x-api-key", b"client-2")]) is None
    denied = check_access(KEYS, Access.ADMIN, [(b"x-api-key", b"client-2")])
    assert denied is not None and denied.code == "admin_key_required"
    assert check_access(KEYS, Access.ADMIN, [(b"x-api-key", b"admin-1")]) is None
    overruled = check_access(KEYS, Access.CLIENT, [(b"x-api-key", b"client-2"), *auth("nope")])
    assert overruled is not None and overruled.code == "invalid_api_key"
    assert check_access(KEYS, Access.CLIENT, [*auth("client-1"), (b"x-api-key", b"nope")]) is None


def test_public_route_and_open_mode_need_no_key() -> None:
    assert check_access(KEYS, Access.PUBLIC, []) is None
    assert check_access(Keys.of([], []), Access.ADMIN, []) is None


def test_keys_from_env_trim_and_skip_empties() -> None:
    env = {"C": " a , ,b ", "A": ""}
    assert read_keys("C", env) == ["a", "b"]
    assert read_keys("A", env) == [] and read_keys(None, env) == []
    keys = Keys.from_env(Settings(api_key_env="C", admin_key_env="A"), env)
    assert keys.scope_of("b") is Access.CLIENT and not keys.admin


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "app.localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "evil.example", "localhost.evil.example", ""])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback_host(host)


def test_refuses_public_address_without_keys() -> None:
    problem = exposure_problem("0.0.0.0", Keys.of([], []), Settings())
    assert problem is not None and "AIO_API_KEYS" in problem and "AIO_ADMIN_KEYS" in problem
    assert "allow_unauthenticated" in problem
    assert exposure_problem("0.0.0.0", KEYS, Settings()) is None
    assert exposure_problem("0.0.0.0", Keys.of([], []), Settings(allow_unauthenticated=True)) is None
    assert exposure_problem("127.0.0.1", Keys.of([], []), Settings()) is None


def test_startup_warnings_name_what_is_open() -> None:
    assert "every route" in startup_warnings("127.0.0.1", Keys.of([], []), Settings())[0]
    assert "AIO_ADMIN_KEYS" in startup_warnings("0.0.0.0", Keys.of(["c"], []), Settings())[0]
    assert startup_warnings("0.0.0.0", KEYS, Settings()) == []


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in values.items()]


def test_cross_site_requests_are_refused() -> None:
    origin = cross_site_problem(headers(host="127.0.0.1:9000", origin="https://evil.example"), True)
    assert origin is not None and (origin.status, origin.code) == (403, "cross_site_request")
    fetch = cross_site_problem(headers(host="127.0.0.1:9000", sec_fetch_site="cross-site"), True)
    assert fetch is not None and fetch.code == "cross_site_request"


def test_same_origin_and_non_browser_requests_pass() -> None:
    assert cross_site_problem(headers(host="127.0.0.1:9000"), True) is None  # curl, SDKs
    assert cross_site_problem(headers(host="localhost:9000", origin="http://localhost:9000"), True) is None
    assert cross_site_problem(headers(host="pod.example:9000", sec_fetch_site="same-origin"), False) is None


def test_dns_rebinding_host_refused_on_loopback_only() -> None:
    rebound = cross_site_problem(headers(host="evil.example:9000"), True)
    assert rebound is not None and rebound.code == "forbidden_host"
    assert cross_site_problem(headers(host="evil.example:9000"), False) is None  # public bind: keys guard it

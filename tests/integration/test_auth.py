"""Access control through a real orchestrator process: scopes, refusal to serve openly, cross-site guards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from tests.integration.conftest import ORCHESTRATOR, fake_model, write_config

CLIENT, ADMIN = "client-key-1", "admin-key-1"
KEY_ENV = {"AIO_API_KEYS": f"{CLIENT},client-key-2", "AIO_ADMIN_KEYS": ADMIN}
ADMIN_ROUTES = [("GET", "/status"), ("GET", "/logs/a"), ("GET", "/docs"), ("GET", "/openapi.json"),
                ("GET", "/upstream/a/health"), ("POST", "/admin/models/a/reset")]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(orchestrator: Any) -> Any:
    return orchestrator({"a": fake_model("a")}, env=KEY_ENV)


def test_health_is_public_and_says_only_that_we_are_up(keyed: Any) -> None:
    reply = httpx.get(keyed.url + "/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}


def test_openai_routes_need_a_client_or_admin_key(keyed: Any) -> None:
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {CLIENT}"}):
        denied = httpx.get(keyed.url + "/v1/models", headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=keyed.url + "/v1", api_key="wrong").models.list()
    for key in (CLIENT, "client-key-2", ADMIN):
        client = OpenAI(base_url=keyed.url + "/v1", api_key=key)
        reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content


def test_admin_routes_refuse_client_keys(keyed: Any) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for method, path in ADMIN_ROUTES:
            anonymous = http.request(method, path)
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            as_client = http.request(method, path, headers=bearer(CLIENT))
            assert as_client.status_code == 403, (method, path, as_client.text)
            assert as_client.json()["error"]["code"] == "admin_key_required"
        for method, path in ADMIN_ROUTES:
            assert http.request(method, path, headers=bearer(ADMIN)).status_code == 200, (method, path)


def test_admin_routes_refuse_what_a_web_page_could_send(keyed: Any) -> None:
    host = keyed.url.removeprefix("http://")
    with httpx.Client(base_url=keyed.url, headers=bearer(ADMIN), timeout=30) as http:
        cross = http.post("/admin/models/a/unload", headers={"Origin": "https://evil.example",
                                                              "Content-Type": "text/plain"})
        assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_site_request"
        fetch = http.get("/logs/a", headers={"Sec-Fetch-Site": "cross-site"})
        assert fetch.status_code == 403
        rebound = http.get("/logs/a", headers={"Host": f"evil.example:{host.split(':')[1]}"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden_host"
        same = http.get("/status", headers={"Origin": f"http://{host}"})
        assert same.status_code == 200


def test_loopback_without_keys_is_open_but_not_to_web_pages(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a")})
    assert httpx.get(orch.url + "/status").status_code == 200
    csrf = httpx.post(orch.url + "/admin/models/a/load", content=b"x",
                      headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert csrf.status_code == 403
    assert orch.status()["a"]["state"] == "stopped"  # the forged load did nothing
    assert "no API key configured" in orch.log()


def run_main(tmp_path: Path, env: dict[str, str], **settings: Any) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path, {"a": fake_model("a")}, host="0.0.0.0", **settings)
    clean = {k: v for k, v in os.environ.items() if k not in ("AIO_API_KEYS", "AIO_ADMIN_KEYS")}
    return subprocess.run([sys.executable, str(ORCHESTRATOR), "--config", str(config)], env={**clean, **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_refuses_to_serve_a_public_address_without_a_key(tmp_path: Path) -> None:
    refused = run_main(tmp_path, {})
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 with no API key" in refused.stderr
    assert "AIO_API_KEYS" in refused.stderr and "allow_unauthenticated" in refused.stderr


def test_public_address_with_keys_or_explicit_opt_in_starts(orchestrator: Any) -> None:
    keyed = orchestrator({"a": fake_model("a")}, env=KEY_ENV, host="0.0.0.0")
    assert httpx.get(keyed.url + "/v1/models", headers=bearer(CLIENT)).status_code == 200
    opened = orchestrator({"b": fake_model("b")}, host="0.0.0.0", allow_unauthenticated=True)
    assert httpx.get(opened.url + "/v1/models").status_code == 200
    assert "anyone who can reach 0.0.0.0" in opened.log()

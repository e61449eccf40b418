"""nginx as the data plane (settings.data_plane.kind: nginx), through a real orchestrator, real nginx with njs
(Debian's nginx and libnginx-mod-http-js: scripts/test.sh installs them) and real echo services.

A request for a ready pinned model, named by its own name, goes from nginx straight to its service (it is
in nginx's fast-path log); every other request reaches the orchestrator and gets its usual answer. Routes
and key scopes are those of the orchestrator (model_orchestrator/auth.py): nginx adds none. Raw bytes are
sent where an HTTP client would normalise the target.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from core.common.contract import service_socket
from core.config.load import config_from_dict
from model_orchestrator.dataplane.conf import nginx_conf, table_json
from model_orchestrator.dataplane.nginx import Nginx, NginxError, find_nginx, find_njs_module, private_folder
from model_orchestrator.dataplane.policy import route_table, upstreams
from tests.integration import raw_http
from tests.integration.conftest import (
    ORCHESTRATOR,
    Orchestrator,
    fake_model,
    processes_with,
    start_orchestrator,
    stop_orchestrator,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="no nginx (scripts/test.sh installs it)")]

CLIENT, ADMIN, FLEET = "plane-client-key", "plane-admin-key", "plane-fleet-key"
KEYS = {"AIO_API_KEYS": CLIENT, "AIO_ADMIN_KEYS": ADMIN, "AIO_FLEET_KEYS": FLEET}
CHAT = "/v1/chat/completions"
MARKER = "marker"  # a fast-path model that answers at once: see fast_log


def body(model: str | None, content: str = "one two three", **extra: Any) -> bytes:
    data: dict[str, Any] = {"messages": [{"role": "user", "content": content}], **extra}
    if model is not None:
        data["model"] = model
    return json.dumps(data).encode()


def folder(orch: Orchestrator) -> Path:
    """The data plane's private folder (the orchestrator logs the socket nginx reaches it on)."""
    found = re.search(r"Uvicorn running on unix socket (\S+)/orchestrator\.sock", orch.log())
    assert found, orch.log()
    return Path(found.group(1))


def fast_log(orch: Orchestrator, since: int = 0) -> list[dict[str, Any]]:
    """The requests nginx sent straight to a service (its fast-path log), from entry ``since`` on.

    nginx writes that log in blocks, flushed every second. So a request for ``marker`` (a fast-path model
    that answers at once) goes last, nginx is told to reopen its logs (SIGUSR1: it flushes them first), and
    once the marker's line is there every earlier request's is too (one worker, the default, logs in order)."""
    path = folder(orch) / "fast.log"

    def entries() -> list[dict[str, Any]]:
        text = path.read_text()
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]

    def markers() -> int:
        return sum(entry["model"] == MARKER for entry in entries())

    def flushed() -> bool:
        before = markers()
        assert post(orch, CHAT, body(MARKER)).status == 200
        os.kill(int((folder(orch) / "nginx.pid").read_text()), signal.SIGUSR1)
        return wait_until(lambda: markers() > before, 2)

    # Again until it shows: a marker sent before nginx's first route table took effect went the slow way.
    assert wait_until(flushed, 10)
    return [entry for entry in entries() if entry["model"] != MARKER][since:]


def post(orch: Orchestrator, target: str, payload: bytes, key: str | None = CLIENT,
         headers: dict[str, str] | None = None) -> raw_http.Response:
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    return raw_http.request(int(orch.url.rsplit(":", 1)[1]), "POST", target, sent, payload)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """An orchestrator behind nginx: ``fast`` (pinned, preloaded: on the fast path), ``other`` (not) and
    ``marker`` (on the fast path, for fast_log)."""
    models = {"fast": fake_model("fast", "--token-delay", "0.3", pinned=True, preload=True, vram_gb=0,
                                 max_concurrency=1, aliases=["fast-alias"]),
              "other": fake_model("other", vram_gb=0),
              MARKER: fake_model(MARKER, pinned=True, preload=True, vram_gb=0)}
    workdir = tmp_path_factory.mktemp("plane")
    orch = start_orchestrator(write_config(workdir, models, data_plane={"kind": "nginx"}),
                              workdir / "orchestrator.log", KEYS)
    try:
        assert wait_until(lambda: orch.state("fast") == orch.state(MARKER) == "ready", 30)
        assert wait_until(lambda: f'"{MARKER}"' in (folder(orch) / "routes.json").read_text() and
                          '"fast"' in (folder(orch) / "routes.json").read_text(), 10)
        yield orch
    finally:
        stop_orchestrator(orch)
    leaked = [p for m in models.values() for p in processes_with(f"--port {m['port']}")]
    assert not leaked, leaked


@pytest.fixture
def seen(plane: Orchestrator) -> int:
    """How many fast-path requests nginx had logged before the test."""
    return len(fast_log(plane))


def test_a_request_for_a_ready_pinned_model_goes_straight_to_its_service(plane: Orchestrator, seen: int) -> None:
    client = openai.OpenAI(base_url=plane.url + "/v1", api_key=CLIENT, max_retries=0)
    answer = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "a b"}])
    assert answer.choices[0].message.content == "a b" and answer.model == "fast"
    chunks = list(client.chat.completions.create(model="fast", stream=True,
                                                 messages=[{"role": "user", "content": "c d e"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "c d e"
    logged = fast_log(plane, seen)
    assert [(e["model"], e["route"], e["status"]) for e in logged] == [("fast", CHAT, 200)] * 2
    assert logged[1]["type"].startswith("text/event-stream")
    # ...and they count in the orchestrator's metrics, read from nginx's log (flushed every second, read every second)
    def counted() -> bool:
        text = httpx.get(plane.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        found = re.search(r'aio_requests_total\{model="fast",route="/v1/chat/completions",status="200"\} (\S+)', text)
        return found is not None and float(found.group(1)) >= seen + 2
    assert wait_until(counted, 5)


def test_nginx_reaches_the_service_on_its_unix_socket_which_still_asks_for_the_service_token(
        plane: Orchestrator) -> None:
    private = folder(plane)
    socket = service_socket(private, "fast")
    assert socket is not None and socket.exists() and socket.stat().st_mode & 0o777 == 0o600
    assert f"server 'unix:{socket}'" in (private / "nginx.conf").read_text()  # the fast path goes there
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://fast") as direct:
        assert direct.get("/health").status_code == 200  # the service itself answers there, as on its port...
        refused = direct.post(CHAT, content=body("fast"), headers={"Authorization": f"Bearer {CLIENT}"})
        assert refused.status_code == 401  # ...and wants the service token, which only nginx and we hold


@pytest.mark.parametrize(("target", "payload", "status"), [
    (CHAT, body("fast-alias"), 200),  # an alias: the orchestrator rewrites the body
    (CHAT, body(None), 400),  # no model: two text models, no default
    (CHAT, body("other"), 200),  # not pinned: the orchestrator starts it
    (CHAT, body("nobody"), 404),
    (CHAT, b"{not json", 400),
    (CHAT + "?x=1", body("fast"), 200),  # a query: not the route itself
    ("/v1/chat/%63ompletions", body("fast"), 200),  # percent-encoded: the orchestrator decodes it once
    ("/v1/x/../chat/completions", body("fast"), 400),  # dot segments: the orchestrator refuses them
    ("/v1/embeddings", body("fast"), 404),  # a route its type does not serve
])
def test_every_other_request_gets_the_orchestrators_answer(plane: Orchestrator, seen: int, target: str,
                                                          payload: bytes, status: int) -> None:
    answer = post(plane, target, payload)
    assert answer.status == status, answer.body
    if status != 200:
        assert set(answer.json()["error"]) >= {"message", "type", "code"}
    assert fast_log(plane, seen) == []


@pytest.mark.parametrize(("key", "headers", "status", "code"), [
    (None, {}, 401, "invalid_api_key"),
    ("wrong", {}, 401, "invalid_api_key"),
    (FLEET, {}, 403, "fleet_key_only"),
    (None, {"X-Api-Key": CLIENT, "Authorization": "Basic eDp5"}, 401, "invalid_api_key"),  # Authorization first
    (None, {"X-Api-Key": CLIENT}, 200, None),  # Anthropic's header, as the orchestrator reads it
    (ADMIN, {}, 200, None),
])
def test_keys_are_judged_as_the_orchestrator_judges_them(plane: Orchestrator, seen: int, key: str | None,
                                                         headers: dict[str, str], status: int,
                                                         code: str | None) -> None:
    answer = post(plane, CHAT, body("fast"), key, headers)
    assert answer.status == status, answer.body
    if code is not None:
        assert answer.json()["error"]["code"] == code
        assert fast_log(plane, seen) == []


def test_a_client_key_reaches_no_admin_route_through_nginx(plane: Orchestrator) -> None:
    port = int(plane.url.rsplit(":", 1)[1])
    auth = {"Authorization": f"Bearer {CLIENT}"}
    for method, target in [("GET", "/status"), ("GET", "/metrics"), ("POST", "/admin/reload"),
                           ("GET", "/logs/fast"), ("GET", "/v1/../status"), ("GET", "/%73tatus"),
                           ("POST", "/upstream/fast/v1/chat/completions"), ("GET", "/fleet/state")]:
        answer = raw_http.request(port, method, target, auth)
        assert answer.status in (400, 403), (target, answer.status, answer.body)
        assert answer.json()["error"]["code"] in ("admin_key_required", "fleet_key_required", "invalid_path"), target


def test_past_max_concurrency_a_request_goes_on_through_the_orchestrator(plane: Orchestrator, seen: int) -> None:
    # The orchestrator bounds what it forwards by max_concurrency too, but it does not see nginx's requests:
    # the service may get up to twice max_concurrency at once (docs/data-plane.md).
    words = " ".join(["w"] * 6)  # 0.3 s a token: 1.5 s each
    headers = {"Authorization": f"Bearer {CLIENT}", "Content-Type": "application/json"}
    with httpx.stream("POST", plane.url + CHAT, content=body("fast", words, stream=True), headers=headers,
                      timeout=30) as first:
        events = first.iter_lines()
        assert next(event for event in events if event.startswith("data: "))  # it holds nginx's one slot now
        second = post(plane, CHAT, body("fast", words))
        rest = list(events)
    assert first.status_code == 200 and "data: [DONE]" in rest, rest[-3:]
    assert second.status == 200, second.body
    assert len(fast_log(plane, seen)) == 1  # the other one went through the orchestrator


def test_a_service_that_dies_is_restarted_and_served_again(orchestrator: Callable[..., Orchestrator]) -> None:
    models = {"fast": fake_model("fast", "--crash-after", "1", pinned=True, preload=True, vram_gb=0)}
    orch = orchestrator(models, env=KEYS, data_plane={"kind": "nginx"})
    assert wait_until(lambda: orch.state("fast") == "ready", 30)
    assert post(orch, CHAT, body("fast")).status == 200
    broken = post(orch, CHAT, body("fast"))  # it kills itself on this one, after nginx sent it
    assert broken.status == 502 and broken.json()["error"]["code"] == "upstream_error", broken.body
    after = post(orch, CHAT, body("fast"))  # nginx cannot connect: the orchestrator restarts it and answers
    assert after.status == 200, after.body
    assert wait_until(lambda: orch.state("fast") == "ready", 30)


def test_with_no_model_on_the_fast_path_nginx_hands_every_request_on(
        orchestrator: Callable[..., Orchestrator]) -> None:
    orch = orchestrator({"cold": fake_model("cold", vram_gb=0)}, env=KEYS, data_plane={"kind": "nginx"})
    answer = post(orch, CHAT, body("cold"))  # started on demand by the orchestrator, behind nginx
    assert answer.status == 200, answer.body
    assert "fast path for no model" in orch.log()


def test_stopping_leaves_no_nginx_and_no_folder(orchestrator: Callable[..., Orchestrator]) -> None:
    orch = orchestrator({"fast": fake_model("fast", pinned=True, preload=True, vram_gb=0)}, env=KEYS,
                        data_plane={"kind": "nginx"})
    private = folder(orch)
    assert private.stat().st_mode & 0o777 == 0o700
    assert processes_with(str(private))  # nginx runs, its paths on its command line
    orch.process.terminate()
    assert orch.process.wait(30) == 0 or orch.process.returncode < 0
    assert wait_until(lambda: not processes_with(str(private)), 10), processes_with(str(private))
    assert not private.exists()


def test_without_nginx_the_orchestrator_says_what_to_install(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"fast": fake_model("fast")}, data_plane={"kind": "nginx",
                                                                              "nginx": "no-such-nginx"})
    scratch = tmp_path / "tmp"  # where its private folder would go (TMPDIR): nothing may be left there
    scratch.mkdir()
    done = subprocess.run([sys.executable, str(ORCHESTRATOR), "--config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 2
    assert "there is no 'no-such-nginx' binary" in done.stderr and "libnginx-mod-http-js" in done.stderr
    assert list(scratch.iterdir()) == []


def test_nginx_accepts_the_configuration_of_any_valid_settings(tmp_path: Path) -> None:
    """Fractions where nginx takes whole numbers (seconds, MiB), an IPv6 address, a model name with quotes."""
    config = config_from_dict({"settings": {"host": "::1", "port": 9000, "limits": {
        "header_timeout": 0.5, "keep_alive_timeout": 2.5, "body_timeout": 0.25, "upload_body_mb": 0.5}},
        "models": {"it's \\ m": {"type": "text", "command": "x", "port": 8000, "pinned": True,
                                   "request_timeout": 1.5}}}, tmp_path / "models.yaml")
    paths = private_folder(tmp_path / "my plane")  # a space in the folder, so in each socket's path
    ups = upstreams(config, {"it's \\ m": str(service_socket(paths.root, "it's \\ m"))})
    paths.conf.write_text(nginx_conf(config.settings, ups, paths, "to'ken", find_njs_module(None)))
    paths.table.write_text(table_json(route_table(config, list(config.models), None, 0), upstreams(config)))
    done = subprocess.run(["nginx", "-t", "-p", str(paths.root), "-c", str(paths.conf)], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_a_configuration_nginx_refuses_never_replaces_the_one_in_place(tmp_path: Path) -> None:
    config = config_from_dict({"settings": {"port": 9000}, "models": {}}, tmp_path / "models.yaml")
    paths = private_folder(tmp_path / "plane")
    nginx = Nginx(find_nginx("nginx"), paths, None)
    paths.table.write_text(table_json(route_table(config, [], None, 0), []))
    good = nginx_conf(config.settings, [], paths, None, find_njs_module(None))
    asyncio.run(nginx.install_conf(good))
    with pytest.raises(NginxError, match="nginx refused its configuration"):
        asyncio.run(nginx.install_conf(good.replace("http {", "http { no_such_directive on;")))
    assert paths.conf.read_text() == good  # a reload (SIGHUP) would still read an accepted configuration
    assert sorted(p.name for p in paths.root.iterdir() if p.name.startswith("nginx.conf")) == ["nginx.conf"]

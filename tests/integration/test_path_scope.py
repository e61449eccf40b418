"""A key reaches its routes and nothing else, however the path is spelt (issue: a client key climbed out of /v1).

uvicorn percent-decodes the request path and the proxy's HTTP client used to normalise it once
more, so ``POST /v1/%2e%2e/offload?level=1`` was checked as a client route and sent to the
service as its private ``/offload``. Now the path is decoded once (model_orchestrator/paths.py),
refused when any later layer could read it differently, and sent as it was decided on.

* Through a real orchestrator process, with raw sockets (HTTP clients normalise what they send):
  the spellings that escaped before, their /upstream twin, every admin route with a client key,
  and a custom endpoint asked of another model. The fake services count every POST they are
  sent (``/whoami`` says how many), so "the service saw nothing" is checked, not assumed.
* In process, a property over generated paths: the ASGI app the orchestrator serves (its
  canonical-path, access and routing layers and the real Proxy) in front of an upstream that
  records the request line of everything it is sent; a stand-in coordinator leases it.
* The same app on uvicorn with each of its HTTP parsers (h11, httptools), which hand the app the
  raw path each their own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import uvicorn
import yarl
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from core.common.asgi import Message
from core.common.errors import ServiceError
from core.config.load import config_from_dict
from core.config.schema import Limits
from core.supervision.park_client import private_paths
from model_orchestrator import auth
from model_orchestrator.http_server import server_options
from model_orchestrator.orchestrator import OrchestratorApp
from model_orchestrator.paths import canonical_path
from model_orchestrator.routing import ROOT_ROUTES
from tests.integration import raw_http
from tests.integration.conftest import (
    REPO,
    Orchestrator,
    fake_model,
    free_port,
    processes_with,
    running_service,
    start_orchestrator,
    stop_orchestrator,
    wait_until,
    write_config,
)
from tests.integration.test_proxy_inprocess import StandInService

pytestmark = pytest.mark.integration

CLIENT_KEY, ADMIN_KEY, FLEET_KEY = "scope-client-key", "scope-admin-key", "scope-fleet-key"
# Connection: close, so that raw_http sees the end of each answer at once instead of waiting to see none follow.
AS_CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json", "Connection": "close"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json", "Connection": "close"}
AS_FLEET = {"Authorization": f"Bearer {FLEET_KEY}", "Content-Type": "application/json", "Connection": "close"}

# "../" as each spelling sent it before the fix: POST /v1/<spelling>offload reached the service's /offload.
ESCAPES = ["%2e%2e/", "..%2f", "%2E%2E%2F", "chat/../../", "%252e%252e/", ".%2e/", "%2e./"]


def envelope(response: raw_http.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body)
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], error
    return error


# --- a real orchestrator -------------------------------------------------------------------------


@dataclass
class Served:
    orch: Orchestrator
    port: int

    def status(self, model: str) -> dict[str, Any]:
        return dict(self.orch.status()[model])

    def seen_by(self, model: str) -> dict[str, Any]:
        """The running service's own account: its pid and how many POSTs it was sent (any path)."""
        reply = httpx.get(f"{self.orch.url}/upstream/{model}/whoami", headers=AS_ADMIN, timeout=10)
        assert reply.status_code == 200, reply.text  # a parked service answers 503
        return dict(reply.json())

    def snapshot(self) -> dict[str, Any]:
        """What must not change when a request is refused: a running, b and ner stopped, nothing parked."""
        status = {name: (s["state"], s["pid"], s["park"]["parks"], s["restarts"])
                  for name, s in self.orch.status().items()}
        return {**status, "a's own count": self.seen_by("a")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """a running (started by one chat), b stopped: a and b cannot share the pretend GPU, so starting
    b would park a. ner is a custom model whose endpoint is /v1/ner."""
    directory = tmp_path_factory.mktemp("scope")
    models = {"a": fake_model("a", vram_gb=6), "b": fake_model("b", vram_gb=6),
              "ner": fake_model("ner", type="custom", endpoint="/v1/ner", vram_gb=1)}
    config = write_config(directory, models, gpu_memory_gb=10, host_memory_gb=100,
                          api_key_env="AIO_API_KEYS", admin_key_env="AIO_ADMIN_KEYS")
    orch = start_orchestrator(config, directory / "orchestrator.log",
                              {"AIO_API_KEYS": CLIENT_KEY, "AIO_ADMIN_KEYS": ADMIN_KEY, "AIO_FLEET_KEYS": FLEET_KEY})
    try:
        port = int(orch.url.rsplit(":", 1)[1])
        chat = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}).encode()
        started = raw_http.request(port, "POST", "/v1/chat/completions", AS_CLIENT, chat, timeout=60)
        assert started.status == 200, started.body
        served = Served(orch, port)
        before = served.status("a")
        assert before["state"] == "ready" and served.seen_by("a")["requests"] == 1
        yield served
    finally:
        stop_orchestrator(orch)
        leaked = [p for m in models.values() for p in processes_with(f"--port {m['port']}")]
        for proc in leaked:
            proc.kill()
        assert not leaked, f"service processes left behind: {leaked}"


def unchanged(served: Served, before: dict[str, Any]) -> None:
    after = served.snapshot()
    assert after == before, f"a refused request changed something:\nbefore {before}\nafter  {after}"
    assert after["a"][0] == "ready" and after["b"][0] == "stopped" and after["ner"][0] == "stopped"


# a. the spellings that escaped /v1, and the /upstream twin


@pytest.mark.parametrize("model", ["a", "b"])
@pytest.mark.parametrize("escape", ESCAPES)
def test_a_client_key_cannot_climb_out_of_v1(served: Served, escape: str, model: str) -> None:
    before = served.snapshot()
    body = json.dumps({"model": model}).encode()
    response = raw_http.request(served.port, "POST", f"/v1/{escape}offload?level=1", AS_CLIENT, body)
    envelope(response, 400, "invalid_path")
    unchanged(served, before)  # a not parked (nor sent anything), b not started


@pytest.mark.parametrize(("target", "status", "code"), [
    ("/upstream/a/offload%3Flevel=1", 400, "invalid_path"),  # '?' once decoded: was sent as /offload?level=1
    ("/upstream/a/offload%3flevel=1", 400, "invalid_path"),
    ("/upstream/a/x/..%2foffload?level=1", 400, "invalid_path"),
    ("/upstream/a/whoami/../offload?level=1", 400, "invalid_path"),
    ("/upstream/a/offload?level=1", 403, "private_route"),
    ("/upstream/a/offload/?level=1", 403, "private_route"),
    ("/upstream/a/%6Fffload?level=1", 403, "private_route"),  # decoded once: /offload, refused as such
    ("/upstream/a/restore", 403, "private_route"),
    ("/upstream/a/state", 403, "private_route"),
    ("/upstream/b/offload?level=1", 403, "private_route"),
    ("/%75pstream/a/offload?level=1", 403, "private_route"),
])
def test_an_admin_key_cannot_reach_the_park_routes_through_upstream(served: Served, target: str, status: int,
                                                                      code: str) -> None:
    before = served.snapshot()
    envelope(raw_http.request(served.port, "POST", target, AS_ADMIN, b"{}"), status, code)
    unchanged(served, before)


def test_plain_upstream_paths_still_reach_the_service(served: Served) -> None:
    """The counterpart of the refusals: decoding once still lets an escaped letter through."""
    before = served.seen_by("a")["requests"]
    for target in ("/upstream/a/whoami", "/%75pstream/a/%77hoami", "/upstream/a/whoami/"):
        response = raw_http.request(served.port, "GET", target, AS_ADMIN)
        if target.endswith("/"):  # FastAPI redirects; the orchestrator passes it on, never follows it
            assert response.status == 307 and response.headers["location"].endswith("/whoami"), response.body
        else:
            assert response.status == 200 and response.json()["path"] == "/whoami", response.body
    assert served.seen_by("a")["requests"] == before  # GETs: the count is of POSTs


# b. a client key reaches nothing else

ADMIN_ROUTES = [("GET", "/status"), ("GET", "/metrics"), ("GET", "/logs/a"), ("POST", "/admin/models/a/load"),
                ("POST", "/admin/models/b/load"), ("GET", "/upstream/a/health"), ("POST", "/upstream/a/whoami"),
                ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/docs/oauth2-redirect"), ("POST", "/fleet/state"),
                ("GET", "/fleet/other")]
# The same routes spelt with escapes: decoded once they are the admin routes, and admin scope.
ENCODED_ADMIN_ROUTES = [("GET", "/%73tatus"), ("GET", "/%6Detrics"), ("GET", "/%6cogs/a"),
                        ("POST", "/%61dmin/models/b/load"), ("GET", "/%75pstream/a/health"),
                        ("GET", "/upstream/%61/health"), ("GET", "/%64ocs"), ("GET", "/openapi%2Ejson")]
# ... and dressed up as OpenAI routes: refused before any route is picked.
DISGUISED_ADMIN_ROUTES = [("POST", "/rerank/..%2fadmin/models/b/load"), ("POST", "/v2/rerank/%2e%2e/%2e%2e/status"),
                          ("POST", "/rerank/../upstream/a/whoami"), ("GET", "/v2/%2e%2e/status"),
                          ("GET", "/v1/..%2fstatus"), ("GET", "/v1/models/../../status"),
                          ("GET", "/v1/models/%2e%2e/%2e%2e/metrics"), ("POST", "/v1/%2e%2e/admin/models/b/load"),
                          ("POST", "/v1/chat/../../upstream/a/whoami"), ("GET", "/v1/%252e%252e/logs/a"),
                          ("POST", "/v1/.%2e/%2e./admin/models/b/load"), ("GET", "//status"), ("GET", "/%2fstatus"),
                          ("GET", "/v1/models%5C..%5C..%5Cstatus"), ("GET", "/v1/models/%2e%2e/%2e%2e/fleet/state")]


@pytest.mark.parametrize(("method", "target"), ADMIN_ROUTES + ENCODED_ADMIN_ROUTES)
def test_a_client_key_gets_403_on_every_admin_route(served: Served, method: str, target: str) -> None:
    before = served.snapshot()
    body = b"{}" if method == "POST" else b""
    envelope(raw_http.request(served.port, method, target, AS_CLIENT, body), 403, "admin_key_required")
    unchanged(served, before)


@pytest.mark.parametrize(("method", "target"), DISGUISED_ADMIN_ROUTES)
def test_an_admin_route_dressed_as_an_openai_route_is_refused(served: Served, method: str, target: str) -> None:
    before = served.snapshot()
    body = b'{"model": "a"}' if method == "POST" else b""
    envelope(raw_http.request(served.port, method, target, AS_CLIENT, body), 400, "invalid_path")
    unchanged(served, before)


@pytest.mark.parametrize("target", ["/fleet/state", "/fleet/%73tate", "/%66leet/state"])
def test_a_client_key_does_not_read_the_fleet_state(served: Served, target: str) -> None:
    envelope(raw_http.request(served.port, "GET", target, AS_CLIENT), 403, "fleet_key_required")
    assert raw_http.request(served.port, "GET", target, AS_FLEET).status == 200  # decoded, it is the route
    assert raw_http.request(served.port, "GET", target, AS_ADMIN).status == 200


@pytest.mark.parametrize(("method", "target"), ADMIN_ROUTES + ENCODED_ADMIN_ROUTES + [
    ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/rerank"), ("GET", "/v1/responses/resp_1")])
def test_a_fleet_key_reaches_the_fleet_state_only(served: Served, method: str, target: str) -> None:
    before = served.snapshot()
    body = b'{"model": "a", "messages": []}' if method == "POST" else b""
    envelope(raw_http.request(served.port, method, target, AS_FLEET, body), 403, "fleet_key_only")
    unchanged(served, before)


@pytest.mark.parametrize(("method", "target"), DISGUISED_ADMIN_ROUTES)
def test_a_fleet_key_on_a_disguised_route_reaches_nothing(served: Served, method: str, target: str) -> None:
    body = b'{"model": "a"}' if method == "POST" else b""
    assert raw_http.request(served.port, method, target, AS_FLEET, body).status in (400, 403)


def test_the_encoded_spellings_are_the_admin_routes_for_an_admin_key(served: Served) -> None:
    """Why the 403s above mean something: decoded once, each spelling is the route itself."""
    for target in ("/%73tatus", "/%6Detrics", "/%6cogs/a", "/%75pstream/a/health", "/%64ocs", "/openapi%2Ejson"):
        response = raw_http.request(served.port, "GET", target, AS_ADMIN)
        assert response.status == 200, (target, response.status, response.body[:300])
    assert raw_http.request(served.port, "GET", "/v1/models", AS_CLIENT).status == 200


# c. a custom endpoint is its model's alone


@pytest.mark.parametrize("model", ["a", "b"])
def test_another_models_custom_endpoint_is_a_404_that_starts_nothing(served: Served, model: str) -> None:
    before = served.snapshot()
    body = json.dumps({"model": model, "text": "Ada Lovelace"}).encode()
    error = envelope(raw_http.request(served.port, "POST", "/v1/ner", AS_CLIENT, body), 404, "route_not_served")
    assert f"'{model}'" in error["message"] and "/v1/ner" in error["message"] and error["param"] == "model"
    unchanged(served, before)  # b not started (nor a parked to make room for it); a not sent the request


# The rerank routes outside /v1 (routing.ROOT_ROUTES, client scope) are model routes too: a model of another
# type is refused before it starts, and the routes' near misses are no model's.
@pytest.mark.parametrize(("target", "status", "code"), [
    ("/rerank", 404, "route_not_served"), ("/v2/rerank", 404, "route_not_served"), ("/%72erank", 404,
                                                                                  "route_not_served"),
    ("/rerank/whoami", 404, "not_found"), ("/v2/rerank/x", 404, "not_found"), ("/v3/rerank", 404, "not_found"),
    ("/rerank/%2e%2e/offload?level=1", 400, "invalid_path"), ("/v2/rerank/..%2fwhoami", 400, "invalid_path"),
])
@pytest.mark.parametrize("model", ["a", "b"])
def test_the_rerank_routes_reach_rerank_models_only(served: Served, target: str, status: int, code: str,
                                                     model: str) -> None:
    before = served.snapshot()
    body = json.dumps({"model": model, "query": "q", "documents": ["d"]}).encode()
    envelope(raw_http.request(served.port, "POST", target, AS_CLIENT, body), status, code)
    unchanged(served, before)


# A stored response's GET and cancel (stored_responses.py, client scope) name no model: the running text models
# are asked (a GET, which the fakes do not count) and nothing starts; their near misses and escapes are refused.
@pytest.mark.parametrize(("method", "target", "status", "code"), [
    ("GET", "/v1/responses/resp_x", 404, "response_not_found"),
    ("POST", "/v1/responses/resp_x/cancel", 404, "response_not_found"),
    ("GET", "/v1/responses/%72esp_x", 404, "response_not_found"),
    ("POST", "/v1/responses/resp_x/offload?level=1", 404, "route_not_found"),
    ("GET", "/v1/responses/resp_x/whoami", 404, "route_not_found"),
    ("POST", "/v1/responses/%2e%2e/%2e%2e/offload?level=1", 400, "invalid_path"),
    ("GET", "/v1/responses/..%2f..%2fstatus", 400, "invalid_path"),
    ("GET", "/v1/responses/x/../../../status", 400, "invalid_path"),
    ("POST", "/v1/responses/resp_x%2fcancel", 400, "invalid_path"),
])
def test_a_stored_responses_routes_reach_no_further(served: Served, method: str, target: str, status: int,
                                                   code: str) -> None:
    before = served.snapshot()
    error = envelope(raw_http.request(served.port, method, target, AS_CLIENT), status, code)
    if code == "response_not_found":
        assert "text models running: a" in error["message"], error
    unchanged(served, before)


# --- d. in process: generated paths through the orchestrator's app -------------------------------------------

PATIENCE = 10.0  # seconds: bounds a hang when the code under test is broken; never waited on when it works


@dataclass
class Seen:
    port: int
    method: str
    target: str  # as on the request line

    @property
    def path(self) -> str:
        """The path the service routes on: decoded once, as uvicorn (and any ASGI server) does."""
        return unquote(self.target.partition("?")[0], errors="strict")


@dataclass
class Recorder:
    """Upstreams on ephemeral ports that answer 200 to everything and record each request line."""

    seen: list[Seen] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def serving(self, count: int) -> AsyncIterator[list[int]]:
        async with contextlib.AsyncExitStack() as stack:
            ports = []
            for _ in range(count):
                server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                await stack.enter_async_context(server)
                ports.append(server.sockets[0].getsockname()[1])
            yield ports

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                lengths = [int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:")]
                length = lengths[0] if lengths else 0
                await reader.readexactly(length)
                method, target, _ = head[0].split(" ")
                self.seen.append(Seen(port, method, target))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class StandInCoordinator:
    """What the proxy asks of the coordinator: every model is servable at once."""

    def __init__(self) -> None:
        self.svc = StandInService()
        self.active = 0

    def servable_now(self, name: str) -> bool:
        return True

    async def acquire(self, name: str, ticket: object = None) -> StandInService:
        self.active += 1
        return self.svc

    def release(self, svc: StandInService) -> None:
        self.active -= 1


@dataclass
class Answer:
    status: int
    body: bytes


@dataclass
class InProcess:
    app: OrchestratorApp
    recorder: Recorder
    ports: dict[str, int]  # model → its upstream's port
    private: dict[str, frozenset[str]]

    async def send(self, method: str, raw: bytes, key: str, body: bytes) -> Answer:
        """One request as uvicorn hands it to the app: ``raw_path`` the path bytes as sent (no query),
        ``path`` those percent-decoded once."""
        raw_path, _, query = raw.partition(b"?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                 "method": method, "path": unquote(raw_path.decode("ascii")), "raw_path": raw_path,
                 "query_string": query, "root_path": "", "server": ("127.0.0.1", 9000),
                 "client": ("127.0.0.1", 40000),
                 "headers": [(b"host", b"127.0.0.1:9000"), (b"authorization", f"Bearer {key}".encode()),
                             (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
        sent: list[Message] = []
        done = asyncio.Event()

        async def receive() -> Message:
            return await inbox.get()

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done.set()
                inbox.put_nowait({"type": "http.disconnect"})  # as uvicorn does once a response is complete

        await asyncio.wait_for(self.app(scope, receive, send), PATIENCE)
        assert done.is_set(), f"no complete response: {sent}"
        return Answer(sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]))


def stand_in_app(log_dir: Path, port_m: int, port_v: int) -> tuple[OrchestratorApp, StandInCoordinator]:
    """The orchestrator's ASGI app with its proxy's coordinator standing in for the service manager:
    model m (a service_script: /offload, /restore, /state private) served on ``port_m``, model v
    (vllm serve with park calls: vLLM's development routes private) on ``port_v``."""
    models = {"m": {"type": "text", "service_script": "tests/fakes/fake_service.py", "port": port_m},
              "v": {"type": "text", "command": "vllm serve x --port {port}", "port": port_v, "park": {"calls": "vllm"}}}
    config = config_from_dict({"settings": {"base_dir": str(REPO), "log_dir": str(log_dir)}, "models": models},
                              log_dir / "models.yaml")
    app = OrchestratorApp(config, host="127.0.0.1", keys=auth.Keys.of([CLIENT_KEY], [ADMIN_KEY]), use_reaper=False)
    coordinator = StandInCoordinator()
    app.runtime.proxy.coordinator = coordinator  # type: ignore[assignment]
    return app, coordinator


@contextlib.asynccontextmanager
async def in_process(log_dir: Path) -> AsyncIterator[InProcess]:
    """``stand_in_app`` started and stopped through its lifespan, the recorder serving both models."""
    recorder = Recorder()
    async with recorder.serving(2) as (port_m, port_v):
        app, coordinator = stand_in_app(log_dir, port_m, port_v)
        lifespan: asyncio.Queue[Message] = asyncio.Queue()
        replies: asyncio.Queue[Message] = asyncio.Queue()
        task = asyncio.create_task(app({"type": "lifespan"}, lifespan.get, replies.put))
        lifespan.put_nowait({"type": "lifespan.startup"})
        assert (await asyncio.wait_for(replies.get(), PATIENCE))["type"] == "lifespan.startup.complete"
        try:
            yield InProcess(app, recorder, {"m": port_m, "v": port_v},
                            {name: private_paths(spec) for name, spec in app.runtime.config.models.items()})
            assert coordinator.active == 0, "a lease was not released"
        finally:
            lifespan.put_nowait({"type": "lifespan.shutdown"})
            assert (await asyncio.wait_for(replies.get(), PATIENCE))["type"] == "lifespan.shutdown.complete"
            await task


def run_examples(tmp_path: Path, check: Callable[[InProcess, asyncio.AbstractEventLoop], None]) -> None:
    """Run hypothesis's examples (``check(harness, loop)``) on one event loop, one app for all of them."""
    loop = asyncio.new_event_loop()
    context = in_process(tmp_path)
    try:
        harness = loop.run_until_complete(context.__aenter__())
        try:
            check(harness, loop)
        except BaseException as exc:
            if not loop.run_until_complete(context.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            loop.run_until_complete(context.__aexit__(None, None, None))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def spelled(char: str, times: int, upper: bool) -> str:
    """``char`` as it is (times 0), percent-encoded once, or twice (``%252e``)."""
    if times == 0:
        return char
    once = "".join(f"%{byte:02X}" if upper else f"%{byte:02x}" for byte in char.encode())
    return once if times == 1 else "%25" + once[1:]


# Weighted by repetition: mostly plain words, "/" and unescaped characters, so that many requests get
# through (near misses of a private route among them), and every hostile form comes up.
WORDS = st.sampled_from(["whoami", "chat", "completions", "v1", "upstream", "m", "v", "x", "...", ".x", "x.", "..x",
                         "a b", "\u00e9"] * 3 + ["?level=1", "#x", "%", ""])
CLIMBS = st.sampled_from(["..", "..", ".", ""])  # what a path climbs out of its prefix with
LAST = st.sampled_from(["offload", "restore", "state", "sleep", "collective_rpc", "wake_up", "whoami", "chat",
                        "completions", "x"])
SEPARATORS = st.sampled_from(["/"] * 24 + ["%2f", "%2F", "\\", "%5c", "%5C", "%252f"])
TIMES_ESCAPED = st.sampled_from([0] * 24 + [1] * 8 + [2])


@st.composite
def encoded(draw: st.DrawFn, text: str) -> str:
    """``text`` with each character as it is or escaped once or twice, upper or lower case hex; characters
    that cannot stand on a request line (a space, '?', '#', '%', non-ASCII) always escaped."""
    out = []
    for char in text:
        times = draw(TIMES_ESCAPED)
        if times == 0 and (char in " ?#%" or not char.isascii()):
            times = 1
        out.append(spelled(char, times, draw(st.booleans())))
    return "".join(out)


@st.composite
def tails(draw: st.DrawFn) -> str:
    """What follows a route's prefix: maybe words, maybe dot-segments (climbing out), maybe more words, and
    a last segment (a private route's name, often), joined by separators; maybe a trailing one, a query."""
    segments = [*draw(st.lists(WORDS, max_size=1)), *draw(st.lists(CLIMBS, max_size=3)),
                *draw(st.lists(WORDS, max_size=2)), draw(LAST)]
    pieces = []
    for index, segment in enumerate(segments):
        if index:
            pieces.append(draw(SEPARATORS))
        pieces.append(draw(encoded(segment)))
    if draw(st.booleans()):
        pieces.append(draw(SEPARATORS))
    return "".join(pieces) + draw(st.sampled_from(["", "", "?level=1", "?level=1&x=..%2f"]))


def normalising_keeps(path: str) -> bool:
    """True when resolving dot-segments and merging empty ones (RFC 3986, as yarl and servers that normalise
    do) leaves ``path`` as it is: no layer after the orchestrator can read it as another path."""
    segments = path.split("/")[1:]
    return not {".", ".."} & set(segments) and "" not in segments[:-1] and yarl.URL("http://h" + path).path == path \
        and posixpath.normpath(path) == (path.rstrip("/") or "/")


def decision(raw: bytes) -> str | None:
    """The path the orchestrator decides on, or None when it must refuse the request outright."""
    try:
        return canonical_path(raw)
    except ServiceError:
        return None


EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=False)


def test_a_client_key_reaches_only_model_routes_and_the_service_gets_the_path_decided_on(tmp_path: Path) -> None:
    def check(h: InProcess, loop: asyncio.AbstractEventLoop) -> None:
        @EXAMPLES
        @given(prefix=st.sampled_from(["/v1/", "/v1/", "/%76%31/", "/v%31%2F", "/v1%2f", "/rerank/", "/v2/rerank/",
                                       "/%72erank%2f"]), tail=tails(),
               model=st.sampled_from(["m", "v"]))
        @example(prefix="/v1/", tail="%2e%2e/offload?level=1", model="m")
        @example(prefix="/v1/", tail="%252e%252e/offload?level=1", model="m")
        @example(prefix="/v1/", tail="chat/../../sleep?level=1", model="v")
        @example(prefix="/v1/", tail="chat/completions", model="m")  # the control: forwarded as it is
        def one(prefix: str, tail: str, model: str) -> None:
            raw = (prefix + tail).encode()
            forwarded = exchange(h, loop, "POST", raw, CLIENT_KEY, json.dumps({"model": model}).encode(), model)
            if forwarded is None:
                return
            seen, decided, where = forwarded
            assert seen.path == decided, where  # sent as decided on
            assert seen.path.startswith("/v1/") or seen.path in ROOT_ROUTES, where
            assert normalising_keeps(seen.path), where

        one()

    run_examples(tmp_path, check)


def exchange(h: InProcess, loop: asyncio.AbstractEventLoop, method: str, raw: bytes, key: str, body: bytes,
             model: str) -> tuple[Seen, str, str] | None:
    """Send one request; a refusal must be a 4xx envelope (400 invalid_path when the path has no canonical
    form) that reached no upstream: None. Else it reached ``model``'s upstream exactly once: (what the
    upstream saw, the canonical path decided on, a description for assertion messages)."""
    before = len(h.recorder.seen)
    answer = loop.run_until_complete(h.send(method, raw, key, body))
    seen = h.recorder.seen[before:]
    decided = decision(raw)
    where = f"{method} {raw!r} (decided on {decided!r}) -> {answer.status} {answer.body[:300]!r}; saw {seen}"
    event(f"answered {answer.status}")
    if decided is None:
        assert answer.status == 400 and json.loads(answer.body)["error"]["code"] == "invalid_path", where
    if answer.status != 200:
        assert 400 <= answer.status < 500 and "error" in json.loads(answer.body), where
        assert seen == [], where
        return None
    assert len(seen) == 1 and seen[0].port == h.ports[model] and seen[0].method == method, where
    assert decided is not None, where
    return seen[0], decided, where


def test_an_admin_key_never_reaches_a_private_route_through_upstream(tmp_path: Path) -> None:
    def check(h: InProcess, loop: asyncio.AbstractEventLoop) -> None:
        @EXAMPLES
        @given(model=st.sampled_from(["m", "v"]), spell=TIMES_ESCAPED, tail=tails(),
               method=st.sampled_from(["POST", "GET"]))
        @example(model="m", spell=0, tail="offload%3Flevel=1", method="POST")
        @example(model="m", spell=0, tail="x/%2e%2e/offload?level=1", method="POST")
        @example(model="v", spell=0, tail="collective_rpc/", method="POST")
        @example(model="m", spell=0, tail="whoami", method="GET")  # the control: forwarded as it is
        def one(model: str, spell: int, tail: str, method: str) -> None:
            raw = (f"/upstream/{spelled(model, spell, upper=True)}/{tail}").encode()
            forwarded = exchange(h, loop, method, raw, ADMIN_KEY, b"{}" if method == "POST" else b"", model)
            if forwarded is None:
                return
            seen, decided, where = forwarded
            path = seen.path
            assert decided == f"/upstream/{model}{path}", where  # sent as decided on
            assert (path.rstrip("/") or "/") not in h.private[model] and normalising_keeps(path), where

        one()

    run_examples(tmp_path, check)


# --- both of uvicorn's HTTP parsers --------------------------------------------------------------------------
# The orchestrator serves with httptools where it is installed (the process above), else with h11. They
# hand the app the raw path differently (httptools drops a '#...' fragment, h11 keeps it), so the spellings
# go through each once more, the stand-in app on uvicorn in front of tests/fakes/raw_upstream.py, which
# answers every request with the request target it received.


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[int]:
    with running_service("tests/fakes/raw_upstream.py", ready_timeout=20) as (_, url):
        yield int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def on_uvicorn(log_dir: Path, upstream_port: int, parser: str) -> Iterator[int]:
    app, coordinator = stand_in_app(log_dir, upstream_port, free_port())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                            **server_options(Limits(), parser))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, PATIENCE), "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(PATIENCE)
    assert not thread.is_alive() and coordinator.active == 0


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_both_http_parsers_hand_over_the_path_that_is_checked(tmp_path: Path, raw_upstream: int,
                                                              parser: str) -> None:
    with on_uvicorn(tmp_path, raw_upstream, parser) as port:
        model_m = json.dumps({"model": "m"}).encode()
        for escape in ESCAPES:
            response = raw_http.request(port, "POST", f"/v1/{escape}offload?level=1", AS_CLIENT, model_m)
            envelope(response, 400, "invalid_path")
        envelope(raw_http.request(port, "POST", "/upstream/m/offload%3Flevel=1", AS_ADMIN, b"{}"), 400, "invalid_path")
        envelope(raw_http.request(port, "POST", "/upstream/m/%6fffload?level=1", AS_ADMIN, b"{}"), 403, "private_route")
        envelope(raw_http.request(port, "GET", "/%73tatus", AS_CLIENT), 403, "admin_key_required")
        # What does get through reaches the upstream as the path that was checked, escaped where it must be.
        for method, target, key, seen in [
            ("POST", "/v1/chat/completions?stream=0", AS_CLIENT, "/v1/chat/completions?stream=0"),
            ("POST", "/%76%31/%63hat/completions", AS_CLIENT, "/v1/chat/completions"),
            ("POST", "/v1/caf%c3%a9/a%20b/.well-known", AS_CLIENT, "/v1/caf%C3%A9/a%20b/.well-known"),
            ("GET", "/%75pstream/m/%77hoami?level=1&x=..%2f", AS_ADMIN, "/whoami?level=1&x=..%2f"),
        ]:
            response = raw_http.request(port, method, target, key, model_m if method == "POST" else b"")
            assert response.status == 200 and response.json()["path"] == seen, (target, response.body)

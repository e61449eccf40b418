"""The data path against hostile clients and broken upstreams (issue #9), through real sockets.

The Proxy runs in-process on uvicorn with ``server_options`` and ``RequestCap`` (what the
orchestrator serves with), in front of tests/fakes/raw_upstream.py, a raw-socket upstream
that resets, answers garbage, stalls and echoes the headers it got. A fake coordinator
stands in for the service manager: it leases a stand-in service that records the proxy's
hang-detection calls and carries the service token.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn

from core.common.asgi import Receive, Scope, Send, send_json
from core.config.load import config_from_dict
from core.config.schema import Limits
from model_orchestrator.http_server import RequestCap, server_options
from model_orchestrator.proxy import Proxy
from model_orchestrator.routing import ModelIndex
from tests.integration import raw_http
from tests.integration.conftest import free_port, running_service, wait_until

pytestmark = pytest.mark.integration

TOKEN = "service-token-for-tests"
KIB = 1024


@dataclass
class StandInService:
    service_token: str = TOKEN
    timed_out: int = 0
    answered: int = 0

    def upstream_timed_out(self) -> None:
        self.timed_out += 1

    def upstream_answered(self) -> None:
        self.answered += 1


class StandInCoordinator:
    def __init__(self, svc: StandInService) -> None:
        self.svc = svc

    def servable_now(self, name: str) -> bool:
        return True

    async def acquire(self, name: str, ticket: object = None) -> StandInService:
        return self.svc

    def release(self, svc: StandInService) -> None:
        pass


class ProxyApp:
    """The orchestrator's routing of the data path, without the control app."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            assert (await receive())["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            await self.proxy.close()
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["path"] == "/health":
            await send_json(send, 200, b'{"status": "ok"}')
        elif scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            await self.proxy.openai_route(scope, receive, send)
        else:
            await self.proxy.upstream_route(scope, receive, send)


@dataclass
class Served:
    port: int
    svc: StandInService
    cap: RequestCap


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with running_service("tests/fakes/raw_upstream.py", ready_timeout=20) as (_, url):
        yield int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def serve(upstream_port: int, **limits: Any) -> Iterator[Served]:
    """The proxy on a free port, ``limits`` applied as the orchestrator applies settings.limits."""
    bounds = Limits(**limits)
    model = {"type": "text", "command": "unused", "port": upstream_port, "request_timeout": 1.5,
             "aliases": ["raw-alias"]}
    index = ModelIndex(config_from_dict({"models": {"raw": model}}, Path("models.yaml")))
    svc = StandInService()
    proxy = Proxy(cast(Any, StandInCoordinator(svc)), index, limits=bounds)
    port = free_port()
    cap = RequestCap(ProxyApp(proxy), bounds.max_requests)
    config = uvicorn.Config(cap, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                            **server_options(bounds))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, 10), "uvicorn did not start"
        yield Served(port, svc, cap)
    finally:
        server.should_exit = True
        thread.join(10)


def chat(model: str = "raw", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def assert_envelope(response: raw_http.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


# --- 1. body limits and the body deadline ---------------------------------------------------


def test_an_oversized_content_length_is_refused_before_the_body_is_read(upstream: int) -> None:
    with serve(upstream, json_body_mb=0.01) as srv, raw_http.connect(srv.port) as sock:
        sock.sendall(raw_http.head("POST", "/v1/chat/completions", {"Content-Type": "application/json"},
                                   length=1024 * 1024 * 1024))  # declares 1 GiB, sends none of it
        response = raw_http.read_response(sock)
    assert_envelope(response, 413, "body_too_large")
    assert response.closed, "the rest of the body would follow: the connection must close"


def test_a_chunked_body_is_counted_while_it_arrives(upstream: int) -> None:
    with serve(upstream, json_body_mb=0.01) as srv, raw_http.connect(srv.port) as sock:
        sock.sendall(raw_http.head("POST", "/v1/chat/completions", {"Transfer-Encoding": "chunked"}))
        for _ in range(4):
            sock.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")  # 16 KiB in all, past the 10 KiB limit
        response = raw_http.read_response(sock)
    assert_envelope(response, 413, "body_too_large")
    assert response.closed


def test_json_routes_and_upload_routes_have_their_own_limits(upstream: int) -> None:
    with serve(upstream, json_body_mb=0.01, upload_body_mb=0.1) as srv:
        big = chat(padding="x" * 30 * KIB)
        assert_envelope(raw_http.request(srv.port, "POST", "/v1/chat/completions", body=big), 413, "body_too_large")
        echoed = raw_http.request(srv.port, "POST", "/upstream/raw/echo", body=big)
        assert echoed.status == 200 and echoed.json()["body_bytes"] == len(big)
        bigger = b"x" * 120 * KIB
        assert raw_http.request(srv.port, "POST", "/upstream/raw/echo", body=bigger).status == 413


def test_a_stalled_body_gets_408_and_the_connection_is_closed(upstream: int) -> None:
    with serve(upstream, body_timeout=1) as srv, raw_http.connect(srv.port) as sock:
        sock.sendall(raw_http.head("POST", "/v1/chat/completions", length=1000) + b'{"model": "raw"')
        started = time.monotonic()
        response = raw_http.read_response(sock)
        waited = time.monotonic() - started
    assert_envelope(response, 408, "body_timeout")
    assert response.closed
    assert 0.8 < waited < 5


# --- 2. hostile JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code"), [
    (b"[" * 100_000, "json_too_deep"),  # was a RecursionError: a plain-text 500
    (b'{"model": "raw", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "json_too_deep"),
    (b'{"model": "raw", "x": [' + b"[" * 100_000, "json_too_deep"),  # large: parsed in the worker process
    (b'{"model": "raw", "x": 1', "invalid_json"),
    (b'{"model": "raw", "x": "' + b"y" * 100 * KIB + b'"', "invalid_json"),
])
def test_hostile_json_gets_a_400_envelope(upstream: int, body: bytes, code: str) -> None:
    with serve(upstream) as srv:
        response = raw_http.request(srv.port, "POST", "/v1/chat/completions", body=body)
        assert_envelope(response, 400, code)
        assert raw_http.request(srv.port, "GET", "/health").status == 200


def test_nesting_up_to_the_limit_and_brackets_in_strings_pass(upstream: int) -> None:
    deep = json.dumps({"model": "raw", "x": json.loads("[" * 63 + "]" * 63), "text": "[[[{{{" * 100}).encode()
    with serve(upstream) as srv:
        assert raw_http.request(srv.port, "POST", "/v1/chat/completions", body=deep).status == 200


def test_large_bodies_are_parsed_off_the_loop_and_aliases_still_renamed(upstream: int) -> None:
    body = chat("raw-alias", numbers=list(range(40_000)))  # ~230 KiB: the worker process's side
    with serve(upstream) as srv:
        response = raw_http.request(srv.port, "POST", "/v1/chat/completions", body=body)
    assert response.status == 200 and response.json()["model"] == "raw"


# --- 3. upstream failures ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/upstream/raw/reset", "/upstream/raw/garbage"])
def test_an_upstream_that_breaks_before_answering_is_a_502_envelope(upstream: int, path: str) -> None:
    with serve(upstream) as srv:
        response = raw_http.request(srv.port, "POST", path, body=b"{}")
    error = assert_envelope(response, 502, "upstream_error")
    assert "'raw'" in error["message"]


# --- 4. headers --------------------------------------------------------------------------------


def test_hop_by_hop_and_credentials_stay_on_their_side_of_the_proxy(upstream: int) -> None:
    headers = {"Connection": "keep-alive, X-Client-Hop", "X-Client-Hop": "1", "X-Kept": "yes",
               "Authorization": "Bearer client-key", "Proxy-Authorization": "Basic eDp5", "Cookie": "session=1",
               "X-Api-Key": "client-key", "Content-Type": "application/json"}
    with serve(upstream) as srv:
        response = raw_http.request(srv.port, "POST", "/v1/chat/completions", headers, body=chat())
    assert response.status == 200
    got = {name.lower(): value for name, value in response.json()["headers"]}
    assert got["authorization"] == f"Bearer {TOKEN}"
    assert got["x-kept"] == "yes" and got["content-type"] == "application/json"
    for dropped in ("x-client-hop", "proxy-authorization", "cookie", "x-api-key", "accept-encoding", "accept",
                    "user-agent"):
        assert dropped not in got, f"{dropped} reached the upstream"
    assert "x-upstream-hop" not in response.headers, "named in the upstream's Connection header"
    assert response.headers["x-upstream-end"] == "kept"


# --- 5. hang detection hooks ---------------------------------------------------------------------


def test_a_silent_upstream_is_a_504_reported_to_the_service(upstream: int) -> None:
    with serve(upstream) as srv:
        response = raw_http.request(srv.port, "POST", "/upstream/raw/stall", body=b"{}")
        assert_envelope(response, 504, "upstream_timeout")
        assert (srv.svc.timed_out, srv.svc.answered) == (1, 0)
        assert raw_http.request(srv.port, "GET", "/upstream/raw/echo").status == 200
        assert (srv.svc.timed_out, srv.svc.answered) == (1, 1)


def test_a_stream_that_stalls_counts_as_a_timeout_after_an_answer(upstream: int) -> None:
    with serve(upstream) as srv:
        response = raw_http.request(srv.port, "POST", "/upstream/raw/stall-stream", body=b"{}")
    assert response.status == 200
    events = [json.loads(line[6:]) for line in response.body.decode().splitlines() if line.startswith("data: ")]
    assert events[0] == {"n": 1} and events[1]["error"]["code"] == "upstream_error"
    assert (srv.svc.timed_out, srv.svc.answered) == (1, 1)


# --- 6. the request cap, end to end ----------------------------------------------------------------


def test_requests_past_max_requests_get_503_while_health_answers(upstream: int) -> None:
    with serve(upstream, max_requests=2) as srv:
        stalled = [raw_http.connect(srv.port) for _ in range(2)]
        for sock in stalled:
            sock.sendall(raw_http.head("POST", "/upstream/raw/stall", length=2) + b"{}")
        assert wait_until(lambda: srv.cap.active == 2, 10), "the two stalled requests never got in"
        refused = raw_http.request(srv.port, "POST", "/v1/chat/completions", body=chat())
        health = raw_http.request(srv.port, "GET", "/health")
        for sock in stalled:
            assert raw_http.read_response(sock).status == 504
            sock.close()
        after = raw_http.request(srv.port, "POST", "/v1/chat/completions", body=chat())
    assert_envelope(refused, 503, "overloaded")
    assert refused.headers["retry-after"] == "1"
    assert health.status == 200 and after.status == 200


def test_the_header_deadline_applies_to_the_proxy_port(upstream: int) -> None:
    with serve(upstream, header_timeout=1) as srv, raw_http.connect(srv.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert raw_http.closed_by_peer(sock, wait=5)

"""Issue #9 end to end: the real orchestrator process in front of tests/fakes/raw_upstream.py.

tests/integration/test_proxy_hardening.py covers each behaviour on the proxy itself; these
check that the orchestrator serves with them. The tests marked ``settings.limits`` need
orchestrator.py to pass the limits on: ``Proxy(..., limits=settings.limits)``,
``RequestCap(app, limits.max_requests)`` and ``uvicorn.run(..., **server_options(limits))``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest

from tests.integration import raw_http
from tests.integration.conftest import Orchestrator, free_port, processes_with, wait_until

pytestmark = pytest.mark.integration

Factory = Callable[..., Orchestrator]


def raw_model(**spec: Any) -> dict[str, Any]:
    return {"type": "text", "service_script": "tests/fakes/raw_upstream.py", "port": free_port(),
            "startup_time": 20, "stop_timeout": 5, "request_timeout": 2, **spec}


def port_of(orch: Orchestrator) -> int:
    return int(orch.url.rsplit(":", 1)[1])


def envelope(response: raw_http.Response | httpx.Response, status: int, code: str) -> dict[str, Any]:
    if isinstance(response, httpx.Response):
        got, body = response.status_code, response.content
    else:
        got, body = response.status, response.body
    assert got == status, body
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] == code, error
    return error


def test_deep_json_is_a_400_not_a_crash(orchestrator: Factory) -> None:
    orch = orchestrator({"raw": raw_model()})
    response = raw_http.request(port_of(orch), "POST", "/v1/chat/completions", body=b"[" * 100_000)
    envelope(response, 400, "json_too_deep")


@pytest.mark.parametrize("path", ["reset", "garbage"])
def test_upstream_failures_before_an_answer_are_502_envelopes(orchestrator: Factory, path: str) -> None:
    orch = orchestrator({"raw": raw_model()})
    response = httpx.post(f"{orch.url}/upstream/raw/{path}", content=b"{}", timeout=30)
    envelope(response, 502, "upstream_error")


def test_the_upstream_gets_the_service_token_instead_of_the_client_credentials(orchestrator: Factory) -> None:
    orch = orchestrator({"raw": raw_model()})
    body = json.dumps({"model": "raw", "messages": []}).encode()
    response = raw_http.request(port_of(orch), "POST", "/v1/chat/completions", body=body, headers={
        "Authorization": "Bearer client-key", "Cookie": "a=1", "Connection": "X-Hop", "X-Hop": "1"})
    assert response.status == 200, response.body
    echo = response.json()
    got = {name.lower(): value for name, value in echo["headers"]}
    assert echo["token"] and got["authorization"] == f"Bearer {echo['token']}"
    assert not {"cookie", "x-hop", "accept-encoding"} & set(got)


def test_health_answers_while_large_bodies_are_parsed(orchestrator: Factory) -> None:
    """15 MiB of numbers takes json.loads over a second, holding the GIL: parsed in the
    orchestrator's own process (even in a thread) it would stall every other request."""
    orch = orchestrator({"raw": raw_model()})
    process = psutil.Process(orch.process.pid)
    rss_before = process.memory_info().rss
    body = b'{"model": "not-a-model", "x": [' + b"1.5," * (15 * 1024 * 1024 // 4) + b"1.5]}"
    answers: list[int] = []

    def send_bodies() -> None:
        for _ in range(3):
            answers.append(httpx.post(orch.url + "/v1/chat/completions", content=body, timeout=60).status_code)

    sender = threading.Thread(target=send_bodies)
    sender.start()
    waits = []
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(orch.url + "/health", timeout=30).status_code == 200
        waits.append(time.monotonic() - started)
        time.sleep(0.05)
    sender.join()
    assert answers == [404] * 3  # parsed in full, then the model was looked up
    rss_growth_mb = (process.memory_info().rss - rss_before) / 2**20
    print(f"/health: {len(waits)} probes, slowest {max(waits) * 1000:.0f} ms; orchestrator RSS +{rss_growth_mb:.0f} MB")
    assert max(waits) < 0.5


# --- these need orchestrator.py to pass settings.limits on (see the module docstring) -----------


def test_settings_limits_bound_request_bodies(orchestrator: Factory) -> None:
    orch = orchestrator({"raw": raw_model()}, limits={"json_body_mb": 0.01, "body_timeout": 1})
    with raw_http.connect(port_of(orch)) as sock:
        sock.sendall(raw_http.head("POST", "/v1/chat/completions", length=2**30))
        response = raw_http.read_response(sock)
    envelope(response, 413, "body_too_large")
    assert response.closed
    with raw_http.connect(port_of(orch)) as sock:
        sock.sendall(raw_http.head("POST", "/v1/chat/completions", length=100) + b"{")
        response = raw_http.read_response(sock)
    envelope(response, 408, "body_timeout")
    assert response.closed


def test_settings_limits_close_half_sent_headers(orchestrator: Factory) -> None:
    orch = orchestrator({"raw": raw_model()}, limits={"header_timeout": 1})
    sockets = [raw_http.connect(port_of(orch)) for _ in range(50)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        # Each wait ends when the server closes that socket (after header_timeout); without
        # the limit none would close (uvicorn has no header timeout of its own).
        assert all(raw_http.closed_by_peer(sock, wait=10) for sock in sockets)
        assert httpx.get(orch.url + "/health", timeout=5).status_code == 200
    finally:
        for sock in sockets:
            sock.close()


def test_settings_limits_cap_requests_in_progress(orchestrator: Factory) -> None:
    orch = orchestrator({"raw": raw_model()}, limits={"max_requests": 1})
    with raw_http.connect(port_of(orch)) as stalled:
        stalled.sendall(raw_http.head("POST", "/upstream/raw/stall", length=2) + b"{}")
        # The model starts on demand: its process appearing shows the stalled request is in progress.
        service_port = orch.models["raw"]["port"]
        started = wait_until(lambda: bool(processes_with(f"--port {service_port}")), 20)
        assert started, "the stalled request never arrived"
        refused = raw_http.request(port_of(orch), "GET", "/status")
        assert httpx.get(orch.url + "/health", timeout=5).status_code == 200
        assert raw_http.read_response(stalled).status == 504
    envelope(refused, 503, "overloaded")
    assert refused.headers["retry-after"] == "1"

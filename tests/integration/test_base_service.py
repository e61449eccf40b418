"""BaseService's contract, through real service processes: health, drain, caps, failures."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psutil
import pytest

from core.common.contract import MODEL_NAME_ENV, SERVICE_TOKEN_ENV
from core.runtime.middleware import take_service_token
from tests.integration.conftest import FAKE, health_status, running_service, wait_until

pytestmark = pytest.mark.integration


def service(*args: str, script: str = FAKE) -> Any:
    return running_service(script, *args, wait_ready=False, ready_timeout=15)


def _status(url: str) -> int | None:
    return health_status(url)


def test_echo_service_runs_standalone() -> None:
    with service("--served-name", "echo", script="models/echo/server.py") as (_, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        body = {"messages": [{"role": "user", "content": "standalone works"}]}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=10).json()
        assert reply["choices"][0]["message"]["content"] == "standalone works"


def test_health_is_503_while_loading_then_200() -> None:
    with service("--start-delay", "2") as (_, url):
        loading = httpx.get(url + "/health", timeout=2)
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        assert wait_until(lambda: _status(url) == 200, 10)
        assert httpx.get(url + "/health").json()["status"] == "ready"


def test_sigterm_drains_in_flight_requests() -> None:
    with service("--stream-chunks", "20", "--token-delay", "0.1") as (proc, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        with stream_in_flight(url) as rest:
            proc.send_signal(signal.SIGTERM)
            after_sigterm = list(rest)
        assert any("tok19" in line for line in after_sigterm)  # finished, not cut off
        assert after_sigterm[-1] == "data: [DONE]"
        assert proc.wait(10) == 0  # drained, then a clean exit (not death by the signal)
        assert proc.stdout is not None and b"fake: stopped" in proc.stdout.read()


def test_drain_is_bounded() -> None:
    """The request would stream for 5 minutes: the service exits while it is still being served."""
    with service("--drain-timeout", "1", "--stream-chunks", "6000", "--token-delay", "0.05") as (proc, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        with stream_in_flight(url) as rest:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            with pytest.raises(httpx.RemoteProtocolError):  # cut off: the stream never ends properly
                for _ in rest:
                    pass


def test_concurrency_cap_answers_429() -> None:
    with service("--max-concurrency", "1", "--stream-chunks", "6000", "--token-delay", "0.05") as (_, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        with stream_in_flight(url):  # holds the one slot
            over = httpx.post(url + "/sleep", params={"seconds": 0}, timeout=5)
            assert over.status_code == 429 and over.json()["error"]["code"] == "overloaded"
            assert "retry-after" in over.headers
            assert httpx.get(url + "/health").status_code == 200  # health is never capped


def test_failed_load_exits_nonzero_with_the_reason() -> None:
    with service("--fail-load") as (proc, _):
        assert proc.wait(15) == 1
        assert proc.stdout is not None
        assert b"fake load failure" in proc.stdout.read()


def test_fatal_in_load_stops_the_start_before_warm_up() -> None:
    with service("--fatal-in-load") as (proc, _):
        assert proc.wait(15) == 1
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        assert "fatal: the weights do not match the config" in output
        assert "warm-up ran" not in output and "fake: ready" not in output


def test_a_route_it_does_not_serve_is_a_404_naming_the_entry_and_its_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODEL_NAME_ENV, "support-bot")  # what the orchestrator gives each service
    with service() as (proc, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        assert httpx.get(url + "/health").json()["service"] == "support-bot"
        wrong = httpx.post(url + "/v1/classify", json={"input": "x"}, timeout=5)
        assert wrong.status_code == 404
        error = wrong.json()["error"]
        assert error["code"] == "route_not_served" and error["type"] == "not_found_error"
        assert error["message"].startswith("The model 'support-bot' does not serve POST /v1/classify; it serves ")
        assert "POST /v1/chat/completions" in error["message"] and "/health" not in error["message"]
        proc.terminate()
        output = proc.communicate(timeout=15)[0].decode()
    assert "support-bot: ready" in output and "support-bot: stopped" in output  # its log lines name the entry


def test_service_token_is_required_on_every_route_but_health(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "per-run-service-token"
    monkeypatch.setenv(SERVICE_TOKEN_ENV, token)  # what the orchestrator gives each service
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with service("--spawn-child") as (proc, url):
        assert wait_until(lambda: _status(url) == 200, 10)  # /health needs no token: readiness probes
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                        {"Authorization": f"Bearer {token}x"}):
            refused = httpx.post(url + "/v1/chat/completions", json=chat, headers=headers, timeout=5)
            assert refused.status_code == 401, headers
            error = refused.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_service_token"
            assert token not in refused.text
        assert httpx.get(url + "/docs", timeout=5).status_code == 401
        ok = httpx.post(url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {token}"},
                        timeout=10)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "hi"
        (child,) = psutil.Process(proc.pid).children()  # --spawn-child: what an engine worker would inherit
        assert SERVICE_TOKEN_ENV not in child.environ()


def test_without_a_token_every_route_is_open() -> None:
    with service() as (_, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        reply = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 200


def test_take_service_token_removes_it_from_the_environment() -> None:
    environ = {SERVICE_TOKEN_ENV: "t", "PATH": "/bin"}
    assert take_service_token(environ) == "t"
    assert environ == {"PATH": "/bin"}
    assert take_service_token(environ) is None
    assert take_service_token({SERVICE_TOKEN_ENV: ""}) is None  # empty: no token, not an empty one


@contextmanager
def stream_in_flight(url: str) -> Iterator[Iterator[str]]:
    """A streamed chat request that the service is serving: its first token has arrived.

    Yields the rest of its ``data:`` lines, still to be read.
    """
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        assert any("tok0" in line for line in lines), "the stream ended before its first token"
        yield lines  # what follows tok0

"""BaseService's contract, through real service processes: health, drain, caps, failures."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import suppress
from typing import Any

import httpx
import pytest

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
    with service() as (proc, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        result: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: result.append(
            httpx.post(url + "/sleep", params={"seconds": 1.5}, timeout=10)))
        worker.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        worker.join(10)
        assert result and result[0].status_code == 200  # finished, not cut off
        assert proc.wait(10) == 0  # drained, then a clean exit (not death by the signal)
        assert proc.stdout is not None and b"fake: stopped" in proc.stdout.read()


def test_drain_is_bounded() -> None:
    with service("--drain-timeout", "1") as (proc, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        threading.Thread(target=lambda: _ignore_errors(url + "/sleep", 30), daemon=True).start()
        time.sleep(0.3)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert time.monotonic() - began < 5


def test_concurrency_cap_answers_429() -> None:
    with service("--max-concurrency", "1") as (_, url):
        assert wait_until(lambda: _status(url) == 200, 10)
        threading.Thread(target=lambda: _ignore_errors(url + "/sleep", 2), daemon=True).start()
        time.sleep(0.3)
        over = httpx.post(url + "/sleep", params={"seconds": 0}, timeout=5)
        assert over.status_code == 429 and over.json()["error"]["code"] == "overloaded"
        assert "retry-after" in over.headers
        assert httpx.get(url + "/health").status_code == 200  # health is never capped


def test_failed_load_exits_nonzero_with_the_reason() -> None:
    with service("--fail-load") as (proc, _):
        assert proc.wait(15) == 1
        assert proc.stdout is not None
        assert b"fake load failure" in proc.stdout.read()


def _ignore_errors(url: str, seconds: float) -> None:
    with suppress(httpx.HTTPError):  # the server may be stopping under it
        httpx.post(url, params={"seconds": seconds}, timeout=seconds + 5)

"""Warm swap through a real orchestrator and real fake services, under a pretend GPU budget.

The fakes (tests/fakes/fake_service.py) run the production BaseService and its park routes
(core/runtime/parking.py); only the memory they give back is pretended (no GPU here). What is real:
the scheduler's park-or-stop choice, the state machine, the park/restore calls, the fallbacks.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Orchestrator, fake_model, wait_until

pytestmark = pytest.mark.integration

SWAP = {"gpu_memory_gb": 10, "host_memory_gb": 100}  # two 6 GB models cannot share the GPU


def two(*extra_a: str, a: dict[str, Any] | None = None, **settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    models = {"a": fake_model("a", *extra_a, vram_gb=6, **(a or {})), "b": fake_model("b", vram_gb=6)}
    return models, {**SWAP, **settings}


def served_by(orch: Orchestrator, model: str) -> int:
    response = orch.chat(model)
    assert response.status_code == 200, response.text
    return int(orch.status()[model]["pid"])


def test_alternating_models_park_and_restore_the_same_processes(orchestrator: Any) -> None:
    models, settings = two("--host-bytes", str(3 << 30))
    orch = orchestrator(models, **settings)
    pid_a = served_by(orch, "a")
    pid_b = served_by(orch, "b")
    status = orch.status()
    assert status["a"]["state"] == "parked" and status["a"]["pid"] == pid_a  # the process stayed
    assert status["a"]["park"]["parks"] == 1 and status["a"]["park"]["level"] == 1
    assert status["a"]["park"]["host_gb"] == 3.0  # as the service reported it
    for _ in range(2):
        assert served_by(orch, "a") == pid_a
        assert served_by(orch, "b") == pid_b
    status = orch.status()
    assert status["a"]["park"]["restores"] == 2 and status["b"]["park"]["parks"] == 2
    assert status["a"]["restarts"] == 0 and status["b"]["restarts"] == 0
    assert "swap: parking a to load b" in orch.log() and "swap: parking b to restore a" in orch.log()


def test_a_service_that_cannot_park_is_stopped_and_not_asked_again(orchestrator: Any) -> None:
    models, settings = two("--cannot-park", "--drain-delay", "1.5")  # its stop takes 1.5 s
    orch = orchestrator(models, **settings)
    served_by(orch, "a")
    served_by(orch, "b")
    status = orch.status()["a"]
    assert status["state"] == "stopped"  # b started only once a's fallback stop was done: never both on the GPU
    assert "cannot park" in status["park"]["unsupported"] and status["park"]["enabled"] is False
    served_by(orch, "a")
    served_by(orch, "b")  # a is stopped straight away now: no second park attempt
    assert orch.log().count("a: ready -> parking") == 1, orch.log()


def test_a_failed_park_falls_back_to_a_stop_and_a_cold_start(orchestrator: Any) -> None:
    models, settings = two("--fail-park")
    orch = orchestrator(models, **settings)
    pid_a = served_by(orch, "a")
    served_by(orch, "b")
    status = orch.status()["a"]
    park = status["park"]
    assert status["state"] == "stopped"
    assert park["failures"] == 1 and "offload failed" in park["last_error"]
    assert served_by(orch, "a") != pid_a  # a new process: cold


def test_a_failed_restore_falls_back_to_a_cold_start(orchestrator: Any) -> None:
    models, settings = two("--fail-restore")
    orch = orchestrator(models, **settings)
    pid_a = served_by(orch, "a")
    served_by(orch, "b")
    assert orch.state("a") == "parked"
    assert served_by(orch, "a") != pid_a  # the restore failed; the same request got a cold start
    park = orch.status()["a"]["park"]
    assert park["failures"] == 1 and "restore failed" in park["last_error"]


def test_too_little_host_memory_stops_instead(orchestrator: Any) -> None:
    models, settings = two(host_memory_gb=5)  # a would hold ~6 GB (its vram_gb) parked
    orch = orchestrator(models, **settings)
    served_by(orch, "a")
    served_by(orch, "b")
    assert orch.state("a") == "stopped"
    assert orch.status()["a"]["park"]["parks"] == 0


def test_park_idle_parks_first_and_ttl_stops_later(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", vram_gb=1, ttl=3, park={"idle": 0.5})}, **SWAP)
    pid = served_by(orch, "a")
    assert wait_until(lambda: orch.state("a") == "parked", 10)
    assert served_by(orch, "a") == pid  # restored on demand
    assert wait_until(lambda: orch.state("a") == "parked", 10)
    assert wait_until(lambda: orch.state("a") == "stopped", 15)


def test_a_crash_while_parked_is_noticed_and_the_next_request_starts_cold(orchestrator: Any) -> None:
    models, settings = two()
    orch = orchestrator(models, **settings)
    pid_a = served_by(orch, "a")
    served_by(orch, "b")
    assert orch.state("a") == "parked"
    os.kill(pid_a, signal.SIGKILL)
    assert wait_until(lambda: orch.state("a") == "stopped", 10)
    assert served_by(orch, "a") != pid_a


def test_parking_is_off_with_no_host_budget(orchestrator: Any) -> None:
    models, settings = two(host_memory_gb=0)
    orch = orchestrator(models, **settings)
    served_by(orch, "a")
    served_by(orch, "b")
    assert orch.state("a") == "stopped"


@pytest.mark.parametrize("path", ["offload?level=1", "restore", "state", "./offload", "offload/"])
def test_park_routes_are_not_reachable_through_upstream(orchestrator: Any, path: str) -> None:
    orch = orchestrator({"a": fake_model("a")})
    response = httpx.post(f"{orch.url}/upstream/a/{path}", timeout=30)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "private_route"
    assert orch.state("a") == "stopped"  # refused before anything was started


# --- command models: vllm serve's sleep routes (tests/fakes/vllm_dev_server.py stands in for it) ----


def vllm_like(name: str, *extra: str, **park: Any) -> dict[str, Any]:
    model = fake_model(name, vram_gb=6, park={"calls": "vllm", **park})
    del model["service_script"], model["args"]
    return {**model, "command": ["{python}", VLLM_LIKE, "--port", "{port}", *extra]}


VLLM_LIKE = "tests/fakes/vllm_dev_server.py"


def calls_of(orch: Orchestrator, model: str) -> list[str]:
    port = orch.models[model]["port"]
    return list(httpx.get(f"http://127.0.0.1:{port}/calls", timeout=10).json())


def complete(orch: Orchestrator, model: str) -> str:
    response = httpx.post(orch.url + "/v1/completions", json={"model": model, "prompt": "hi"}, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_serve_parks_through_its_sleep_routes(orchestrator: Any, level: int) -> None:
    orch = orchestrator({"a": vllm_like("a", level=level), "b": fake_model("b", vram_gb=6)}, **SWAP)
    assert complete(orch, "a") == "hello"
    served_by(orch, "b")
    assert orch.state("a") == "parked"
    assert complete(orch, "a") == "hello"  # woken the full way: never "!!!!"
    wake = ["wake_up weights,kv_cache"] if level == 1 else [
        "wake_up weights", "collective_rpc reload_weights", "wake_up kv_cache", "reset_prefix_cache"]
    assert calls_of(orch, "a") == ["completion max_tokens=None", f"sleep level={level} mode=wait", *wake,
                                   "completion max_tokens=1", "completion max_tokens=None"]


def test_vllm_serve_without_dev_mode_is_stopped_instead(orchestrator: Any) -> None:
    orch = orchestrator({"a": vllm_like("a", "--no-dev-mode"), "b": fake_model("b", vram_gb=6)}, **SWAP)
    complete(orch, "a")
    served_by(orch, "b")
    status = orch.status()["a"]
    assert status["state"] == "stopped"
    assert "park failed" in status["park"]["last_error"] and "404" in status["park"]["last_error"]
    assert complete(orch, "a") == "hello"  # cold start


@pytest.mark.parametrize("path", ["sleep?level=1", "wake_up", "collective_rpc", "is_sleeping", "reset_prefix_cache",
                                  "sleep/", "x/../sleep"])
def test_vllm_dev_routes_are_not_reachable_through_upstream(orchestrator: Any, path: str) -> None:
    orch = orchestrator({"a": vllm_like("a")})
    response = httpx.post(f"{orch.url}/upstream/a/{path}", json={"method": "reload_weights"}, timeout=30)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "private_route"


def test_an_operator_parks_and_a_request_restores(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", vram_gb=1), "c": fake_model("c", "--cannot-park")}, **SWAP)
    pid = served_by(orch, "a")
    parked = httpx.post(orch.url + "/admin/models/a/park", timeout=30)
    assert parked.status_code == 200 and parked.json() == {"model": "a", "state": "parked"}
    assert served_by(orch, "a") == pid
    stopped = httpx.post(orch.url + "/admin/models/c/park", timeout=30)  # not running: nothing to park
    assert stopped.status_code == 409 and stopped.json()["error"]["code"] == "cannot_park"
    assert "it is stopped" in stopped.json()["error"]["message"]
    served_by(orch, "c")
    refused = httpx.post(orch.url + "/admin/models/c/park", timeout=30)  # it says it cannot
    assert refused.json()["state"] == "stopped"  # it tried, was told it cannot, and stopped it
    again = httpx.post(orch.url + "/admin/models/c/park", timeout=30)
    assert again.status_code == 409 and "cannot park (--cannot-park)" in again.json()["error"]["message"]

"""``GET /fleet/state``: what a pod publishes for a gateway in front of several pods, from a real orchestrator."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from tests.integration.conftest import fake_model

pytestmark = pytest.mark.integration

ADMIN, CLIENT = "fleet-admin", "fleet-client"


def test_the_pod_publishes_its_models_budget_and_identity_to_an_admin_key(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", "--start-delay", "0.3", vram_gb=6), "b": fake_model("b", vram_gb=6)},
                        env={"AIO_ADMIN_KEYS": ADMIN, "AIO_API_KEYS": CLIENT}, gpu_memory_gb=10)
    url, admin = orch.url + "/fleet/state", {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {CLIENT}"}, timeout=10).status_code == 403
    before = httpx.get(url, headers=admin, timeout=10).json()
    assert before["pod_id"] == socket.gethostname() and before["accepting"] is True and before["schema"] == 1
    status = httpx.get(orch.url + "/status", headers=admin, timeout=10).json()
    assert before["config_hash"] == status["config"]["hash"] and set(before["models"]) == {"a", "b"}
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(orch.url + "/v1/chat/completions", json=chat, timeout=60,
                      headers={"Authorization": f"Bearer {CLIENT}"}).status_code == 200
    after = httpx.get(url, headers=admin, timeout=10).json()
    assert after["boot_id"] == before["boot_id"] and after["generated_at"] >= before["generated_at"]
    a, b = after["models"]["a"], after["models"]["b"]
    assert (a["state"], a["in_flight"], a["waiting"], a["fits_without_eviction"]) == ("ready", 0, 0, True)
    assert a["load_seconds"] >= 0.3 and before["models"]["a"]["load_seconds"] is None
    assert (b["state"], b["fits_without_eviction"]) == ("stopped", False)  # 6 + 6 GB > 10: a would go
    assert after["budget"]["total_gb"] == 10 and after["budget"]["used_gb"] >= 6

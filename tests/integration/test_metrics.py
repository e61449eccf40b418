"""GET /metrics through a real orchestrator, after real requests, swaps and failures.

The exposition is parsed with prometheus-client's own parser (never grepped), and each
figure is compared with what the test did.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_orchestrator.auth import Access, route_access
from tests.integration.conftest import Orchestrator, fake_model

pytestmark = pytest.mark.integration

GIB = 1024**3
CHAT = "/v1/chat/completions"


def scrape(orch: Orchestrator) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as {(name, labels): value}."""
    response = httpx.get(orch.url + "/metrics", headers=orch.admin_headers, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def stream_chat(orch: Orchestrator, model: str) -> list[str]:
    client = openai.OpenAI(base_url=orch.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "one two three"}],
                                            stream=True, stream_options={"include_usage": True})
    return [c.choices[0].delta.content or "" for c in stream if c.choices]


def test_requests_swaps_and_state_are_counted(orchestrator: Any) -> None:
    models = {"a": fake_model("a", vram_gb=6), "b": fake_model("b", vram_gb=6)}
    orch = orchestrator(models, gpu_memory_gb=10, host_memory_gb=100)
    assert orch.chat("a", "one two").status_code == 200
    assert orch.chat("a", max_tokens=-5).status_code == 400  # the service's own 400, passed through
    assert orch.chat("b").status_code == 200  # a is parked to make room
    assert "".join(stream_chat(orch, "a")) == "one two three"  # restored
    s = scrape(orch)
    assert value(s, "aio_requests_total", model="a", route=CHAT, status="200") == 2
    assert value(s, "aio_requests_total", model="a", route=CHAT, status="400") == 1
    assert value(s, "aio_requests_total", model="b", route=CHAT, status="200") == 1
    assert value(s, "aio_e2e_request_latency_seconds_count", model="a", stream="false") == 2
    assert value(s, "aio_e2e_request_latency_seconds_count", model="a", stream="true") == 1
    assert value(s, "aio_time_to_first_byte_seconds_count", model="a", stream="true") == 1
    assert value(s, "aio_queue_wait_seconds_count", model="a") == 3
    # usage: the echo counts words, plus one token opening each message; the 400 has none
    assert value(s, "aio_prompt_tokens_total", model="a") == (1 + 2) + (1 + 3)  # a message-start token each
    assert value(s, "aio_generation_tokens_total", model="a") == 2 + 3
    assert value(s, "aio_swaps_total", model="a", action="start", reason="request") == 1
    assert value(s, "aio_swaps_total", model="a", action="park", reason="eviction") == 1
    assert value(s, "aio_swaps_total", model="a", action="restore", reason="request") == 1
    assert value(s, "aio_swaps_total", model="b", action="park", reason="eviction") == 1
    for kind in ("start", "park", "restore"):
        assert value(s, "aio_model_transition_seconds_count", model="a", kind=kind) == 1, kind
    assert value(s, "aio_model_state", model="a", state="ready") == 1
    assert value(s, "aio_model_state", model="b", state="parked") == 1
    assert value(s, "aio_model_state", model="b", state="ready") == 0
    assert value(s, "aio_model_parks_total", model="a") == 1 and value(s, "aio_model_restores_total", model="a") == 1
    assert value(s, "aio_gpu_memory_declared_bytes", model="a") == 6 * GIB
    assert value(s, "aio_gpu_budget_bytes") == 10 * GIB and value(s, "aio_host_budget_bytes") == 100 * GIB
    assert value(s, "aio_requests_in_flight", model="a") == 0


def test_failures_stops_and_admin_actions_are_counted(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a"), "bad": fake_model("bad", "--fail-load", max_restarts=1)})
    assert orch.chat("bad").status_code == 503
    assert orch.chat("a").status_code == 200
    assert httpx.post(orch.url + "/admin/models/a/unload", timeout=30).status_code == 200
    s = scrape(orch)
    assert value(s, "aio_requests_total", model="bad", route=CHAT, status="503") == 1
    assert value(s, "aio_model_state", model="bad", state="failed") == 1
    assert value(s, "aio_model_failures", model="bad") == 1
    assert value(s, "aio_swaps_total", model="a", action="stop", reason="admin") == 1
    assert value(s, "aio_model_transition_seconds_count", model="a", kind="stop") == 1


def test_metrics_need_the_admin_key() -> None:
    assert route_access("GET", "/metrics") is Access.ADMIN


# --- loading comments keep a waiting stream connected ---------------------------------------------


def test_a_stream_waiting_for_a_slow_start_gets_loading_comments_then_its_events(orchestrator: Any) -> None:
    orch = orchestrator({"slow": fake_model("slow", "--start-delay", "2")}, stream_keep_alive=0.5)
    body = {"model": "slow", "messages": [{"role": "user", "content": "hello there"}], "stream": True}
    with httpx.stream("POST", orch.url + CHAT, json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    assert len(comments) >= 2 and comments[0].startswith(": loading slow ")  # every 0.5 s of a 2 s load
    assert lines.index(comments[-1]) < lines.index(next(x for x in lines if x.startswith("data:")))
    assert lines[-1] == "data: [DONE]"
    # the openai client ignores the comments: the stream parses as usual
    assert orch.chat("slow").status_code == 200
    httpx.post(orch.url + "/admin/models/slow/unload", timeout=30)
    assert "".join(stream_chat(orch, "slow")) == "one two three"


def test_a_start_that_fails_after_the_comments_ends_the_stream_with_an_error_event(orchestrator: Any) -> None:
    orch = orchestrator({"bad": fake_model("bad", "--start-delay", "1.5", "--fail-load")}, stream_keep_alive=0.5)
    client = openai.OpenAI(base_url=orch.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="bad", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError, match="failed to start"):
        list(stream)


def test_a_request_that_waited_says_how_long_and_what_it_loaded(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", "--start-delay", "0.5")})
    first = orch.chat("a")
    assert first.headers["x-aio-loaded"] == "start" and float(first.headers["x-aio-queue-seconds"]) >= 0.5
    second = orch.chat("a")
    assert "x-aio-loaded" not in second.headers and "x-aio-queue-seconds" not in second.headers

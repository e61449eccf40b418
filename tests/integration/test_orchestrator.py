"""The orchestrator as a user runs it: a real process, real services, real sockets."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.integration import raw_http
from tests.integration.conftest import fake_model, processes_with, wait_until

pytestmark = pytest.mark.integration


def test_on_demand_start_and_model_list(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a")})
    listed = httpx.get(orch.url + "/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["state"]) for m in listed["data"]] == [("a", "stopped")]
    response = orch.chat("a", "hello there")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "hello there"
    status = orch.status()["a"]
    assert status["state"] == "ready" and status["pid"] and status["in_flight"] == 0


def test_swap_when_both_do_not_fit(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", vram_gb=6), "b": fake_model("b", vram_gb=6)}, gpu_memory_gb=10)
    assert orch.chat("a").json()["model"] == "a"
    assert orch.chat("b").json()["model"] == "b"
    assert orch.state("a") == "parked" and orch.state("b") == "ready"  # its process kept (warm swap)


def test_both_stay_loaded_when_they_fit(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", vram_gb=4), "b": fake_model("b", vram_gb=4)}, gpu_memory_gb=10)
    orch.chat("a")
    orch.chat("b")
    assert orch.state("a") == "ready" and orch.state("b") == "ready"


def test_model_without_vram_takes_the_whole_gpu(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", vram_gb=1), "big": fake_model("big")}, gpu_memory_gb=80)
    orch.chat("a")
    orch.chat("big")
    assert orch.state("a") == "parked" and orch.state("big") == "ready"


def test_slow_stream_chunks_arrive_one_by_one(orchestrator: Any) -> None:
    """The service streams for 30 s: its first tokens reach the client while it is still streaming."""
    orch = orchestrator({"s": fake_model("s", "--stream-chunks", "600", "--token-delay", "0.05")})
    loaded = httpx.post(orch.url + "/admin/models/s/load", timeout=30)  # the read timeout: streaming only
    assert loaded.json()["state"] == "ready"
    body = {"model": "s", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", orch.url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        tokens = (line for line in response.iter_lines() if line.startswith("data: {") and "tok" in line)
        first = [json.loads(next(tokens)[6:])["choices"][0]["delta"]["content"].strip() for _ in range(3)]
        assert first == ["tok0", "tok1", "tok2"]
        assert orch.status()["s"]["in_flight"] == 1  # not buffered: the upstream is still streaming


def test_service_killed_mid_stream_errors_then_recovers(orchestrator: Any) -> None:
    orch = orchestrator({"s": fake_model("s", "--stream-chunks", "50", "--token-delay", "0.1")})
    orch.chat("s")
    pid = orch.status()["s"]["pid"]
    body = {"model": "s", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    events = []
    with httpx.stream("POST", orch.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    os.kill(pid, signal.SIGKILL)
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_error" and "broke off" in error["message"]
    retry = orch.chat("s")
    assert retry.status_code == 200, retry.text
    assert orch.status()["s"]["restarts"] == 1


def test_repeated_crashes_mark_the_model_failed(orchestrator: Any) -> None:
    orch = orchestrator({"c": fake_model("c", "--crash-after", "0", max_restarts=2)})
    for _ in range(2):  # each request kills the service while it is being served
        assert orch.chat("c").status_code == 502
    response = orch.chat("c")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_failed"
    assert int(response.headers["retry-after"]) > 100
    assert orch.state("c") == "failed"
    assert "crashed" in orch.status()["c"]["last_error"]
    reset = httpx.post(orch.url + "/admin/models/c/reset")
    assert reset.json()["state"] == "stopped"


def test_start_failure_reaches_the_client_with_the_reason(orchestrator: Any) -> None:
    orch = orchestrator({"bad": fake_model("bad", "--fail-load")})
    response = orch.chat("bad")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_start_failed"
    assert "exited with status 1" in error["message"] and "fake load failure" in error["message"]
    assert "retry-after" in response.headers


def test_orchestrator_sigkill_leaves_no_service_behind(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", "--spawn-child", vram_gb=1), "b": fake_model("b", vram_gb=1)},
                        gpu_memory_gb=10)
    orch.chat("a")
    orch.chat("b")
    ports = [str(m["port"]) for m in orch.models.values()]
    services = [p for port in ports for p in processes_with(f"--port {port}")]
    family = services + [c for p in services for c in p.children(recursive=True)]
    assert len(family) >= 3  # two services and a grandchild
    orch.process.kill()
    orch.process.wait()
    assert wait_until(lambda: not [p for p in family if p.is_running() and p.status() != "zombie"], 10), \
        [p for p in family if p.is_running()]


def test_two_clients_alternating_two_models(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a"), "b": fake_model("b")}, batch_window=0.5)
    results: dict[str, list[int]] = {"a": [], "b": []}

    def client(model: str) -> None:
        with orch.client() as http:
            for i in range(20):
                body = {"model": model, "messages": [{"role": "user", "content": f"{model} {i}"}]}
                response = http.post("/v1/chat/completions", json=body)
                ok = response.status_code == 200 and response.json()["model"] == model
                results[model].append(200 if ok else response.status_code)

    threads = [threading.Thread(target=client, args=(m,)) for m in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == {"a": [200] * 20, "b": [200] * 20}


def test_errors_use_the_openai_envelope(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a"), "b": fake_model("b")})
    unknown = orch.chat("nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found" and "a, b" in unknown.json()["error"]["message"]
    not_json = httpx.post(orch.url + "/v1/chat/completions", content=b"{oops", timeout=10)
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    no_default = httpx.post(orch.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert no_default.status_code == 400 and no_default.json()["error"]["code"] == "model_required"
    missing_route = httpx.get(orch.url + "/nowhere", timeout=10)
    assert missing_route.status_code == 404 and missing_route.json()["error"]["type"] == "not_found_error"
    bad_param = orch.chat("a", max_tokens=-5)  # the service's own 400, passed through untouched
    assert bad_param.status_code == 400 and bad_param.json()["error"]["param"] == "max_tokens"
    assert orch.chat("a").status_code == 200  # and the service is still healthy


def test_endpoint_defaults_and_aliases(orchestrator: Any) -> None:
    image = fake_model("img", type="image", endpoint="/v1/images/generations")
    orch = orchestrator({"chat": fake_model("chat", aliases=["gpt-4o"]), "img": image}, defaults={"text": "chat"})
    assert orch.chat("gpt-4o").json()["model"] == "chat"
    no_model = httpx.post(orch.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                          timeout=30)
    assert no_model.json()["model"] == "chat"
    generated = httpx.post(orch.url + "/v1/images/generations", json={"prompt": "a cat"}, timeout=30)
    assert generated.json()["service"] == "img" and generated.json()["path"] == "/v1/images/generations"


def test_aliases_work_against_an_upstream_that_rejects_unknown_names(orchestrator: Any) -> None:
    """Like vLLM's server, the upstream knows only its own name: the orchestrator sends that name."""
    orch = orchestrator({"qwen": fake_model("qwen", "--strict-model-name", aliases=["gpt-4o-mini", "qwen-7b"])})
    client = OpenAI(base_url=orch.url + "/v1", api_key="unused")
    for name in ("gpt-4o-mini", "qwen-7b", "qwen"):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "one two"}])
        assert reply.model == "qwen" and reply.choices[0].message.content == "one two"
    # /upstream passes the body through untouched: the alias reaches the service, which refuses it
    direct = httpx.post(orch.url + "/upstream/qwen/v1/chat/completions", timeout=30,
                        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    assert direct.status_code == 404 and direct.json()["error"]["code"] == "model_not_found"  # it is strict
    bypass = httpx.post(f"http://127.0.0.1:{orch.models['qwen']['port']}/v1/chat/completions", timeout=30,
                        json={"model": "qwen", "messages": [{"role": "user", "content": "x"}]})
    assert bypass.status_code == 401  # the service answers only the orchestrator (its service token)
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "a b c"}])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "a b c"


def test_upstream_passthrough_and_logs(orchestrator: Any) -> None:
    orch = orchestrator({"org/model-1": fake_model("m1")})
    who = httpx.get(orch.url + "/upstream/org/model-1/whoami", timeout=30)
    assert who.status_code == 200 and who.json()["service"] == "m1"
    logs = httpx.get(orch.url + "/logs/org/model-1", params={"lines": 50}, timeout=10)
    assert "org/model-1: ready" in logs.text  # the service labels its lines with its entry


def test_client_disconnect_cancels_the_upstream_request(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a")})
    orch.chat("a")  # the service's first POST

    def posts_served() -> int:
        return int(httpx.get(orch.url + "/upstream/a/whoami", timeout=10).json()["requests"])

    with raw_http.connect(int(orch.url.rsplit(":", 1)[1])) as client:
        client.sendall(raw_http.head("POST", "/upstream/a/sleep?seconds=30", length=0))
        assert wait_until(lambda: posts_served() == 2, 10), "the request never reached the service"
    # the client has gone while the service was still working on its request
    assert wait_until(lambda: "POST /sleep cancelled" in httpx.get(orch.url + "/logs/a").text, 10)
    assert wait_until(lambda: orch.status()["a"]["in_flight"] == 0, 10)


def test_ttl_unloads_idle_models(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", ttl=1)})
    orch.chat("a")
    assert orch.state("a") == "ready"
    assert wait_until(lambda: orch.state("a") == "stopped", 30)
    assert "a: ready -> stopping (idle for 1s (ttl))" in orch.log()  # stopped by the TTL, not for another reason


def test_preload_and_admin_unload_load(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", preload=True), "b": fake_model("b", vram_gb=1)})
    assert wait_until(lambda: orch.state("a") == "ready", 30)
    assert httpx.post(orch.url + "/admin/models/a/unload", timeout=30).json()["state"] == "stopped"
    assert httpx.post(orch.url + "/admin/models/b/load", timeout=30).json()["state"] == "ready"


def test_wait_bound_and_queue_bound(orchestrator: Any) -> None:
    orch = orchestrator({"slow": fake_model("slow", "--start-delay", "4")}, max_wait=1, max_queue=1)
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(orch.chat("slow")))
    first.start()
    assert wait_until(lambda: orch.status()["slow"]["waiting"] == 1, 5)
    second = orch.chat("slow")
    first.join(30)
    assert second.status_code == 503 and second.json()["error"]["code"] == "queue_full"
    assert results[0].status_code == 503 and results[0].json()["error"]["code"] == "wait_timeout"
    assert "retry-after" in results[0].headers


def test_log_followers_are_capped_and_commands_redacted(orchestrator: Any) -> None:
    secret = {"type": "custom", "command": ["sleep", "--hf-token", "hf_s3cret", "--api-key=sk-s3cret"],
              "port": fake_model("x")["port"]}
    orch = orchestrator({"a": fake_model("a"), "s": secret}, limits={"max_log_followers": 1})
    command = orch.status()["s"]["command"]
    assert command == ["sleep", "--hf-token", "***", "--api-key=***"]
    with httpx.stream("GET", orch.url + "/logs/a", params={"follow": "true"}, timeout=10) as first:
        assert first.status_code == 200
        second = httpx.get(orch.url + "/logs/a", params={"follow": "true"}, timeout=10)
        assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_followers"
        assert "retry-after" in second.headers
    # the first follower's slot is released when it disconnects
    assert wait_until(lambda: _follow_status(orch) == 200, 5)


def _follow_status(orch: Any) -> int:
    with httpx.stream("GET", orch.url + "/logs/a", params={"follow": "true"}, timeout=10) as reply:
        return reply.status_code


def test_a_ready_model_is_bounded_by_default_and_its_queue_by_max_queue(orchestrator: Any) -> None:
    """max_concurrency defaults to 32, so a ready model's backlog is bounded too: past it, max_queue, then 503."""
    orch = orchestrator({"a": fake_model("a")}, max_queue=4)
    orch.chat("a")
    results: list[httpx.Response] = []

    def slow() -> None:
        results.append(httpx.post(orch.url + "/upstream/a/sleep", params={"seconds": 4}, timeout=60))

    threads = [threading.Thread(target=slow) for _ in range(40)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: orch.status()["a"]["in_flight"] == 32 and orch.status()["a"]["waiting"] == 4, 10)
    for thread in threads:
        thread.join(60)
    refused = [r for r in results if r.status_code == 503]
    assert len(refused) == 4 and all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert all("retry-after" in r.headers for r in refused)
    assert sum(r.status_code == 200 for r in results) == 36

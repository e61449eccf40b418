"""The vLLM text service's life: answering while its engine builds, draining before its engine stops,
and a dead engine reported as errors. Each test owns its service process (each one ends it)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.models import text_cases
from tests.models.text_cases import TextService, text_service

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r models/requirements-cpu.txt)")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ENGINE_BUILT = r"init engine \(profile, create kv cache, warmup model\) took"  # logged by vLLM's EngineCore
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-qwen", max_position_embeddings=4096)  # a long stream


def vllm_args(model: Path, max_model_len: int = 1024) -> list[str]:
    return ["--model", str(model), "--engine", "vllm", "--served-model-name", "tiny",
            "--max-model-len", str(max_model_len), "--enforce-eager", "--enable-log-requests"]


@dataclass
class HealthAnswer:
    status: int
    state: str
    seconds: float
    while_building: bool  # the engine core existed before the request and had not finished when it was answered


def ask_health(service: TextService) -> HealthAnswer:
    core_started = bool(service.engine_processes())
    began = time.monotonic()
    reply = httpx.get(service.url + "/health", timeout=30)
    seconds = time.monotonic() - began
    building = core_started and not service.log.seen(ENGINE_BUILT)
    return HealthAnswer(reply.status_code, reply.json()["status"], seconds, building)


def test_health_answers_while_the_engine_builds_and_sigterm_then_stops_it(tiny_text: Path) -> None:
    with text_service(*vllm_args(tiny_text), wait_ready=False) as service:
        answers = [ask_health(service)]
        while not answers[-1].while_building and answers[-1].status != 200:
            time.sleep(0.2)  # polling pace, not synchronisation: each answer is checked
            answers.append(ask_health(service))
        assert all(a.seconds < 2 for a in answers), answers  # the loop is free while the engine builds
        last = answers[-1]
        assert (last.status, last.state, last.while_building) == (503, "loading", True), answers
        engine = service.engine_processes()
        service.proc.send_signal(signal.SIGTERM)  # mid-build: the build cannot be interrupted...
        assert service.proc.wait(240) == 0, service.log.tail()
        # ...so the engine it made is shut down as soon as it exists, leaving no process behind.
        service.log.wait_for("stopped while vLLM's engine was being built: shutting it down")
        _, alive = psutil.wait_procs(engine, timeout=30)
        assert not alive, alive


def test_sigterm_drains_a_stream_before_stopping_the_engine(tiny_text: Path) -> None:
    # A stream of seconds, not a fraction of one: on a loaded 2-core machine the service may take over
    # two seconds to act on SIGTERM, and the stream must still be open when it does.
    with text_service(*vllm_args(tiny_text, max_model_len=4096)) as service:
        engine = service.engine_processes()
        assert {p.name() for p in engine} >= {"VLLM::EngineCore"}, engine
        start = service.log.mark()
        body = {"model": "tiny", "messages": HI, "max_tokens": 3000, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", service.url + "/v1/chat/completions", json=body, timeout=120) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            events = [text_cases.parse_event(next(lines))]
            os.kill(service.proc.pid, signal.SIGTERM)  # the service process only, as the orchestrator does
            events += [text_cases.parse_event(line) for line in lines]
        chunks = [e for e in events[:-1] if isinstance(e, dict)]
        assert events[-1] == "[DONE]" and not [c for c in chunks if "error" in c], events[-3:]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 3000  # all of it, after SIGTERM
        assert service.proc.wait(120) == 0, service.log.tail()
        drained = service.log.position("Waiting for connections to close", start)  # uvicorn, with our stream open
        assert drained < service.log.position(r"\[shutdown\] MPClient: start", start)  # then the engine stops
        _, alive = psutil.wait_procs(engine, timeout=30)
        assert not alive, alive


def test_a_dead_engine_ends_requests_with_errors_and_the_service_exits(tmp_path: Path) -> None:
    from models.vllm.tiny import build

    # Both requests enter a frozen engine, so they run in one batch and neither can end before the other
    # has begun; the engine is frozen again once the stream has begun, then killed. Answers are ten times
    # longer than the other tests' so that a starved test still freezes it long before the end.
    long_context = build(tmp_path / "tiny-qwen-8k", max_position_embeddings=8192)
    with text_service(*vllm_args(long_context, 8192)) as service, ThreadPoolExecutor(1) as pool:
        engine = service.engine_processes()
        [core] = [p for p in engine if p.name() == "VLLM::EngineCore"]
        start = service.log.mark()
        core.suspend()
        body: dict[str, Any] = {"model": "tiny", "messages": HI, "max_tokens": 8000, "ignore_eos": True}
        whole = pool.submit(httpx.post, service.url + "/v1/chat/completions", json=body, timeout=120)
        with httpx.stream("POST", service.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            first = service.log.position("Added request", start)
            service.log.position("Added request", first + 1)  # both requests are in the engine
            core.resume()
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            events = [text_cases.parse_event(next(lines))]
            core.suspend()
            core.kill()
            events += [text_cases.parse_event(line) for line in lines]
        assert events[-1] == "[DONE]"
        error = events[-2]
        assert isinstance(error, dict) and error["error"]["code"] == 500, events[-3:]
        finishes = [c["choices"][0]["finish_reason"] for c in events[:-2] if isinstance(c, dict) and c["choices"]]
        assert set(finishes) == {None}, finishes  # cut off: never a finish_reason
        reply = whole.result()
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "InternalServerError", reply.text
        assert service.proc.wait(120) == 1, service.log.tail()
        service.log.wait_for("fatal: vLLM's engine")
        _, alive = psutil.wait_procs(engine, timeout=30)
        assert not alive, alive

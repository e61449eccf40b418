"""The text service under test: how to run it, follow its log, and the API checks every engine passes.

A test module subclasses ``TextApiCases`` (as ``Test...``) with its engine's expectations and
provides a module-scoped ``service`` fixture; the cases then run against that one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
import openai
import psutil

from tests.integration.conftest import REPO, free_port, health_status, stop_service_group, wait_until
from tests.models.service_log import ServiceLog

SERVER = REPO / "models" / "vllm" / "server.py"


@dataclass
class TextService:
    proc: subprocess.Popen[bytes]
    url: str
    log: ServiceLog

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def tree(self) -> list[psutil.Process]:
        """The service process and everything it started (vLLM's engine core and workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:  # it has exited meanwhile
            return []

    def engine_processes(self) -> list[psutil.Process]:
        """vLLM's engine core and workers (they name themselves VLLM::EngineCore, VLLM::Worker...)."""
        found = []
        for proc in self.tree()[1:]:
            try:
                if proc.name().startswith("VLLM::"):
                    found.append(proc)
            except psutil.Error:
                continue
        return found


@contextmanager
def text_service(*args: str, wait_ready: bool = True, timeout: float = 240, env: dict[str, str] | None = None
                 ) -> Iterator[TextService]:
    """``models/vllm/server.py --port <free> *args``; ready (or just answering, without ``wait_ready``).

    Stopped afterwards with SIGTERM (its own clean shutdown stops vLLM's processes), then its
    process group (everything it started) is killed if it did not stop in 60 s.
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    assert proc.stdout is not None
    service = TextService(proc, f"http://127.0.0.1:{port}", ServiceLog(proc.stdout))
    try:
        def answered() -> bool:
            status = health_status(service.url)
            return (status == 200 if wait_ready else status is not None) or proc.poll() is not None

        assert wait_until(answered, timeout), f"the text service did not start in {timeout}s:\n{service.log.tail()}"
        assert proc.poll() is None, f"the text service exited with {proc.returncode}:\n{service.log.tail()}"
        yield service
    finally:
        _stop(service)


def _stop(service: TextService) -> None:
    # The whole process group, even when the service itself has already exited (a crash
    # leaves vLLM's engine core and workers running otherwise).
    stop_service_group(service.proc, grace=60)
    service.log.close()


# --- requests -------------------------------------------------------------------------------


def chat(url: str, **fields: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def stream_events(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any] | str]:
    events: list[dict[str, Any] | str] = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(parse_event(line))
    return events


def parse_event(line: str) -> dict[str, Any] | str:
    data = line.removeprefix("data: ")
    return data if data == "[DONE]" else dict(json.loads(data))


# --- the cases --------------------------------------------------------------------------------


class TextApiCases:
    """OpenAI API checks every engine passes alike, against the module's ``service`` fixture.

    What differs between engines (their error envelopes, what they refuse) is tested in each
    engine's own module, with that engine's expectations spelled out.
    """

    names: ClassVar[list[str]]  # --served-model-name (the first is the one responses carry)
    max_model_len: ClassVar[int]

    def test_chat(self, service: TextService) -> None:
        reply = chat(service.url, max_tokens=6, temperature=0, ignore_eos=True)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "chat.completion" and body["model"] == self.names[0]
        choice, usage = body["choices"][0], body["usage"]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert usage["prompt_tokens"] > 3 and usage["completion_tokens"] == 6
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    def test_seed_is_deterministic(self, service: TextService) -> None:
        first = chat(service.url, temperature=1.0, seed=1234).json()["choices"][0]["message"]["content"]
        second = chat(service.url, temperature=1.0, seed=1234).json()["choices"][0]["message"]["content"]
        assert first == second

    def test_stream(self, service: TextService) -> None:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0, "ignore_eos": True}
        events = stream_events(service.url, "/v1/chat/completions", body)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if isinstance(e, dict) and e["choices"]]
        usage_event = events[-2]
        assert isinstance(usage_event, dict) and usage_event["choices"] == []
        assert len(chunks) >= 2  # incremental, not one blob
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert usage_event["usage"]["completion_tokens"] == 12

    def test_completions(self, service: TextService) -> None:
        reply = httpx.post(service.url + "/v1/completions", timeout=120,
                           json={"prompt": "The quick brown", "max_tokens": 5, "n": 2})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
        events = stream_events(service.url, "/v1/completions", {"prompt": "The quick", "max_tokens": 4, "stream": True})
        assert events[-1] == "[DONE]" and all(isinstance(e, dict) and "text" in e["choices"][0] for e in events[:-1])

    def test_an_empty_prompt_gets_400_and_the_service_survives(self, service: TextService) -> None:
        empty = httpx.post(service.url + "/v1/completions", json={"prompt": "", "max_tokens": 2}, timeout=30)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
        assert httpx.get(service.url + "/health", timeout=5).status_code == 200
        assert chat(service.url).status_code == 200

    def test_model_list_names_the_model_and_its_context(self, service: TextService) -> None:
        models = service.client().models.list().data
        assert [m.id for m in models] == self.names
        assert all(m.model_extra and m.model_extra["max_model_len"] == self.max_model_len for m in models)

    def test_stop_ends_the_choice_with_stop(self, service: TextService) -> None:
        fields = {"temperature": 0, "max_tokens": 20, "ignore_eos": True}
        free = chat(service.url, **fields).json()["choices"][0]["message"]["content"]
        # Greedy decoding gives the same text again; stop at a two-character piece of it.
        word = next((free[i:i + 2] for i in range(2, len(free) - 1) if _plain(free[i:i + 2])), "")
        assert word, f"the greedy output {free!r} has no ASCII text to stop on"
        stopped = chat(service.url, **fields, stop=[word]).json()["choices"][0]
        assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == free[:free.index(word)]


def _plain(text: str) -> bool:
    return text.isascii()  # not a piece of a multi-byte character, which decodes differently when cut

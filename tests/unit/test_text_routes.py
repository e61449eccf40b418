"""The shared OpenAI text layer (core/runtime/openai_text.py, core/runtime/text_routes.py) over echo's word engine,
in process. The same routes serve the transformers engine (tests/models/test_text.py) and, through
the fake service, every orchestrator streaming test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.common.http_errors import install_error_handlers
from core.runtime.openai_text import TextChunk, sse_stream
from core.runtime.text_routes import mount_text_routes
from models.echo.server import ECHO_LIMITS, EchoEngine

CONTEXT = 64


def make_client(strict_model_name: bool = False) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    engine = EchoEngine(token_delay=0, max_model_len=CONTEXT)
    mount_text_routes(app, lambda: engine, ["echo", "echo-alias"], ECHO_LIMITS, strict_model_name=strict_model_name)
    return TestClient(app)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as running:
        yield running


def chat(client: TestClient, content: str = "one two three", **fields: Any) -> Any:
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **fields})


def events(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    """The SSE stream's events, parsed; also checks every event is framed as ``data: ...\\n\\n``."""
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    raw = response.text
    assert raw.endswith("\n\n")
    frames = raw.removesuffix("\n\n").split("\n\n")
    assert all(frame.startswith("data: ") for frame in frames), raw
    return [frame[6:] if frame == "data: [DONE]" else json.loads(frame[6:]) for frame in frames]


def test_chat_echoes_the_last_message_and_counts_the_whole_prompt(client: TestClient) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "model": "anything"}).json()
    assert body["object"] == "chat.completion" and body["model"] == "echo" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "one two three"},
                                "finish_reason": "stop", "logprobs": None}]
    # Each message opens with one template token, as a chat template's markers are tokens too.
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_max_tokens_cuts_the_answer_with_length(client: TestClient) -> None:
    choice = chat(client, max_tokens=2).json()["choices"][0]
    assert choice["message"]["content"] == "one two" and choice["finish_reason"] == "length"


@pytest.mark.parametrize(("stop", "content", "tokens"), [
    (["thr"], "one two ", 3),  # cut inside a word: the text ends before the stop, the word was generated
    (["two", "one"], "", 1),  # the earliest stop wins, even at the very start
    ("zzz", "one two three", 3),
])
def test_stop_sequences_end_the_answer_before_them(client: TestClient, stop: Any, content: str, tokens: int) -> None:
    body = chat(client, stop=stop).json()
    assert body["choices"][0]["message"]["content"] == content and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == tokens


def test_a_chat_stream_is_one_event_per_word_then_usage_then_done(client: TestClient) -> None:
    got = events(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "streamed words arrive"}],
                                                  "stream_options": {"include_usage": True}})
    chunks, usage_event, done = got[:-2], got[-2], got[-1]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"content": "streamed", "role": "assistant"}, {"content": " words"}, {"content": " arrive"}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert all(c["object"] == "chat.completion.chunk" and c["choices"][0]["logprobs"] is None for c in chunks)
    assert len({c["id"] for c in got[:-1]}) == 1
    assert usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] == 3
    assert done == "[DONE]"


def test_a_stream_without_include_usage_has_no_usage_event(client: TestClient) -> None:
    got = events(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a b"}]})
    assert got[-1] == "[DONE]" and all(event["choices"] and "usage" not in event for event in got[:-1])


def test_completions_stream_every_choice_of_n(client: TestClient) -> None:
    got = events(client, "/v1/completions", {"prompt": "The quick brown", "max_tokens": 2, "n": 2})
    texts = [(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in got[:-1]]
    assert texts == [(0, "The", None), (0, " quick", "length"), (1, "The", None), (1, " quick", "length")]
    assert all(e["object"] == "text_completion" for e in got[:-1])


def test_completions_answer_the_prompt(client: TestClient) -> None:
    body = client.post("/v1/completions", json={"prompt": "The quick brown"}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "The quick brown"


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"ignore_eos": True}, "ignore_eos", "unsupported"),  # echo cannot go past the prompt's last word
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported"),
    ({"max_tokens": CONTEXT}, "max_tokens", "context_length_exceeded"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
])
def test_what_cannot_be_honoured_is_refused_in_openai_envelopes(client: TestClient, fields: dict[str, Any],
                                                                 param: str, code: str) -> None:
    reply = chat(client, **fields, stream=True)  # refused before any stream begins
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_ignore_eos_false_is_accepted(client: TestClient) -> None:
    assert chat(client, ignore_eos=False).json()["choices"][0]["message"]["content"] == "one two three"


def test_a_prompt_longer_than_the_context_is_refused(client: TestClient) -> None:
    reply = client.post("/v1/completions", json={"prompt": "w " * CONTEXT})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"


def test_strict_model_name_refuses_other_names_like_vllm() -> None:
    with make_client(strict_model_name=True) as strict:
        refused = chat(strict, model="gpt-4o-mini")
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found" and refused.json()["error"]["param"] == "model"
        assert chat(strict, model="echo-alias").json()["model"] == "echo"  # every served name, answered as the first
        assert chat(strict).status_code == 200  # no model: the service's own


def test_model_list_names_every_served_name_with_the_context(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in data] == [("echo", CONTEXT), ("echo-alias", CONTEXT)]


def test_an_engine_that_breaks_mid_stream_ends_it_with_an_error_event() -> None:
    async def breaking() -> AsyncIterator[TextChunk]:
        yield TextChunk(0, "partial", 1)
        raise RuntimeError("engine died")

    async def drain() -> list[bytes]:
        got: list[bytes] = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for event in sse_stream("chat", "m", breaking(), 1, include_usage=True):
                got.append(event)
        return got

    first, error = asyncio.run(drain())
    assert first.startswith(b"data: ") and b"partial" in first
    body = json.loads(error.removeprefix(b"data: "))
    assert body["error"]["code"] == "generation_failed" and "engine died" in body["error"]["message"]


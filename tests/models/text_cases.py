"""Checks of the text service's OpenAI API, shared by the transformers and vLLM engine test modules."""

from __future__ import annotations

import json
from typing import Any

import httpx


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
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_chat(url: str) -> None:
    reply = chat(url, max_tokens=6, temperature=0)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 3 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if body["choices"][0]["finish_reason"] == "length":
        assert usage["completion_tokens"] == 6


def check_seed_is_deterministic(url: str) -> None:
    first = chat(url, temperature=1.0, seed=1234).json()["choices"][0]["message"]["content"]
    second = chat(url, temperature=1.0, seed=1234).json()["choices"][0]["message"]["content"]
    assert first == second


def check_stream(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "ignore_eos": True}
    events = stream_events(url, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e["choices"]]
    usage_event = events[-2]
    assert isinstance(usage_event, dict) and usage_event["choices"] == []
    assert len(chunks) >= 2  # incremental, not one blob
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    if chunks[-1]["choices"][0]["finish_reason"] == "length":
        assert usage_event["usage"]["completion_tokens"] == 12


def check_completions(url: str) -> None:
    reply = httpx.post(url + "/v1/completions", json={"prompt": "The quick brown", "max_tokens": 5, "n": 2},
                       timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    events = stream_events(url, "/v1/completions", {"prompt": "The quick", "max_tokens": 4, "stream": True})
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) and "text" in e["choices"][0] for e in events[:-1])


def check_bad_requests(url: str) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ]
    for fields, param in cases:
        reply = chat(url, **fields)
        assert reply.status_code == 400, (fields, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (fields, error)
    empty = httpx.post(url + "/v1/completions", json={"prompt": ""}, timeout=30)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert chat(url).status_code == 200

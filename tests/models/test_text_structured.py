"""Tools and JSON answers on the transformers engine (the demo's text model), through the official openai
client and LangChain: a grammar (xgrammar, as vLLM uses) holds even the tiny random-weight Qwen2 to the
schema, so a forced tool call has the right name and arguments, and a JSON schema answer parses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from tests.models import text_cases
from tests.models.text_cases import TextService, text_service

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.integration

WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                  "parameters": {"type": "object", "properties": {
                                                      "city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                      "celsius": {"type": "boolean"}},
                                                      "required": ["city", "celsius"]}}}
TIME: Any = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK: Any = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TextService]:
    from models.vllm.tiny import build

    model = build(tmp_path_factory.mktemp("models") / "tiny-qwen")
    with text_service("--model", str(model), "--engine", "transformers", "--served-model-name", "tiny-qwen") as up:
        yield up


@pytest.fixture(scope="module")
def client(service: TextService) -> openai.OpenAI:
    return service.client()


def test_a_named_tool_choice_gives_that_call_with_arguments_of_its_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny-qwen", messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Rome") and isinstance(arguments["celsius"], bool)


def test_required_calls_one_of_the_tools_and_streams_it(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny-qwen", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice="required", max_tokens=200, stream=True,
                                                 stream_options={"include_usage": True}))
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function is not None and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_a_tool_result_goes_back_into_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="tiny-qwen", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=200)
    call = (first.choices[0].message.tool_calls or [])[0]
    history: Any = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model="tiny-qwen", messages=history, tools=[WEATHER], max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_json_schema_answer_parses_and_matches(client: openai.OpenAI) -> None:
    schema: Any = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}
    reply = client.chat.completions.create(model="tiny-qwen", messages=ASK, max_tokens=200, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    answer = json.loads(reply.choices[0].message.content or "")
    assert answer["city"] in ("Paris", "Rome") and isinstance(answer["sunny"], bool)
    assert reply.choices[0].finish_reason == "stop"


def test_json_object_and_a_json_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny-qwen", messages=ASK, max_tokens=40, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "length" or isinstance(json.loads(reply.choices[0].message.content
                                                                               or ""), dict)
    completion = client.completions.create(model="tiny-qwen", prompt="Is it sunny?", max_tokens=40, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "yes", "schema": {
            "type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"]}}}})
    assert isinstance(json.loads(completion.choices[0].text)["sunny"], bool)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_structure_requests_name_the_field(service: TextService, fields: dict[str, Any], param: str) -> None:
    reply = text_cases.chat(service.url, **fields)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


class Forecast(BaseModel):
    city: Literal["Paris", "Rome"]
    sunny: bool


def test_langchain_bind_tools_and_with_structured_output(service: TextService) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="tiny-qwen", base_url=service.url + "/v1", api_key="unused", max_tokens=200,
                      max_retries=0)

    def get_weather(city: Literal["Paris", "Rome"], celsius: bool) -> str:
        """The weather in a city."""
        return "sunny"

    called = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")
    forecast = chat.with_structured_output(Forecast, method="json_schema").invoke("Weather in Rome?")
    assert isinstance(forecast, Forecast)
    via_tool = chat.with_structured_output(Forecast, method="function_calling").invoke("Weather in Rome?")
    assert isinstance(via_tool, Forecast)

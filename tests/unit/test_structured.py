"""core/runtime/structured.py: what a request asks to be held to, tool calls read back out of text, and
messages shaped for a chat template (pure; the grammar itself runs in tests/models/test_text_structured.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.common.errors import ServiceError
from core.runtime.structured import Structure, structure_for, template_messages, tool_calls_in

F: Any = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer"}}}}}
G: Any = {"type": "function", "function": {"name": "g"}}  # no parameters: an empty object


def call_of(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def test_what_each_request_is_held_to() -> None:
    empty = {"type": "object", "properties": {}}
    assert structure_for([F, G], {"type": "function", "function": {"name": "g"}}, None) == Structure(
        call_of("g", empty), tool_call=True)
    assert structure_for([F, G], "required", None) == Structure(
        {"anyOf": [call_of("f", F["function"]["parameters"]), call_of("g", empty)]}, tool_call=True)
    assert structure_for([F], "auto", None) is None and structure_for([F], "none", None) is None  # the model decides
    assert structure_for(None, None, {"type": "json_object"}) == Structure(None)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    assert structure_for(None, None, {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
                         ) == Structure(schema)
    assert structure_for(None, None, {"type": "text"}) is None
    assert Structure(schema).key != Structure(schema, tool_call=True).key


@pytest.mark.parametrize(("tools", "choice", "response_format", "param"), [
    ([{"type": "function"}], None, None, "tools"),
    ([{"type": "retrieval"}], None, None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, None, "tools"),
    ([F], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice"),
    ([F], "sometimes", None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    (None, None, {"type": "json_schema", "json_schema": {"name": "n"}}, "response_format"),
    (None, None, {"type": "yaml"}, "response_format"),
])
def test_a_malformed_request_is_a_400_naming_the_field(tools: Any, choice: Any, response_format: Any,
                                                       param: str) -> None:
    with pytest.raises(ServiceError) as info:
        structure_for(tools, choice, response_format)
    assert info.value.status == 400 and info.value.param == param


def test_tool_calls_are_read_out_of_the_text() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g"}' \
           '</tool_call>'
    said, calls = tool_calls_in(text)
    assert said == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"x": 1}),
                                                                                              ("g", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert tool_calls_in("plain words") == ("plain words", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert tool_calls_in(broken) == (broken, [])  # what does not parse stays text


def test_an_assistants_calls_reach_the_template_with_object_arguments() -> None:
    messages: list[dict[str, Any]] = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 2}'}}]},
        {"role": "tool", "content": "4", "tool_call_id": "call_1"}]
    shaped = template_messages(messages)
    assert shaped[0]["tool_calls"][0]["function"]["arguments"] == {"x": 2} and shaped[1] == messages[1]
    with pytest.raises(ServiceError):
        template_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])

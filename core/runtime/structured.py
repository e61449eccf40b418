"""Structured output behind the project's OpenAI layer: JSON answers (``response_format``) and tool calls.

What a request asks for becomes a ``Structure``: a JSON schema the answer must match (none: any
JSON object), wrapped in Qwen 2.5's tool-call tags (Hermes style, what vLLM's ``hermes`` parser
reads) when a tool must be called. An engine holds its decoding to it with a grammar (the
transformers engine: xgrammar, the library vLLM uses, models/vllm/grammar.py), so the answer
parses even from random weights. Tool calls are read back out of the text here. Pure functions.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from core.common.errors import bad_request

TOOL_OPEN, TOOL_CLOSE = "<tool_call>\n", "\n</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Structure:
    """What the decoding must produce: JSON (of ``schema``, or any object), as a tool call when ``tool_call``."""

    schema: dict[str, Any] | None
    tool_call: bool = False

    @property
    def key(self) -> str:
        """One string per distinct grammar (the engine caches compiled grammars by it)."""
        return json.dumps([self.schema, self.tool_call], sort_keys=True)


def tool_parameters(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Each function tool's name and parameters schema; 400 naming ``tools`` when one is malformed."""
    found: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"'tools[{index}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                              "\"parameters\": {...}}}}.", "tools")
        parameters = function.get("parameters") or _NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise bad_request(f"'tools[{index}].function.parameters' must be a JSON schema object.", "tools")
        found[function["name"]] = parameters
    return found


def structure_for(tools: list[dict[str, Any]] | None, tool_choice: Any, response_format: dict[str, Any] | None
                  ) -> Structure | None:
    """The structure a chat request asks for; None for free text (tool_choice auto or none: the model decides)."""
    parameters = tool_parameters(tools)
    forced = _forced_tools(parameters, tool_choice)
    if forced:
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": parameters[name]},
                  "required": ["name", "arguments"], "additionalProperties": False} for name in forced]
        return Structure(calls[0] if len(calls) == 1 else {"anyOf": calls}, tool_call=True)
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return Structure(None)
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                              "{...}}}.", "response_format")
        return Structure(schema)
    if kind != "text":
        raise bad_request(f"response_format type must be text, json_object or json_schema, not {kind!r}.",
                          "response_format")
    return None


def _forced_tools(parameters: dict[str, dict[str, Any]], tool_choice: Any) -> list[str]:
    """The tools the answer must call one of: a named one, or any (``required``); none for auto and none."""
    if tool_choice in (None, "auto", "none"):
        return []
    if tool_choice == "required":
        if not parameters:
            raise bad_request("tool_choice 'required' needs 'tools'.", "tool_choice")
        return list(parameters)
    name = ((tool_choice or {}).get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str) or name not in parameters:
        raise bad_request(f"tool_choice must be auto, none, required or a function of 'tools' "
                          f"({', '.join(parameters) or 'none given'}).", "tool_choice")
    return [name]


def tool_calls_in(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the text around them or None, the tool calls) of an answer: each ``<tool_call>{"name", "arguments"}
    </tool_call>`` block that parses becomes an OpenAI tool call; one that does not stays text."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    position = 0
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        arguments = call.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments)}})
    kept.append(text[position:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: an assistant's tool calls with their arguments as objects
    (OpenAI sends JSON strings; Qwen's template writes them out with ``tojson``)."""
    shaped = []
    for message in messages:
        calls = message.get("tool_calls")
        shaped.append({**message, "tool_calls": [_call_for_template(call) for call in calls]} if calls else message)
    return shaped


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            raise bad_request("An assistant message's tool call has arguments that are not JSON.", "messages") \
                from None
    return {**call, "function": function}

"""The project's own OpenAI chat/completions layer, shared by every text engine that has none.

The transformers engine (models/vllm/engine_transformers.py) and the echo diagnostic service
(models/echo/server.py) both sit behind it; the vLLM engine is served by vLLM's own OpenAI layer
instead (models/vllm/vllm_openai.py). core/runtime/text_routes.py mounts the routes.

Requests are validated here (400s with the offending ``param``), turned into engine-neutral
``GenerationParams``, and the engine's ``TextChunk`` stream is shaped into OpenAI's
``chat.completion`` / ``text_completion`` objects or their SSE chunk streams.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from core.common.errors import bad_request, error_body
from core.common.sse import DONE, sse_event
from core.runtime.structured import Structure, template_messages, tool_calls_in

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
TokenT = TypeVar("TokenT")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (an agent's loop)
    tool_call_id: str | None = None  # a tool's answer: to which call


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields chat and completions share. Unknown fields are accepted and ignored, as OpenAI clients
    send many (user, logprobs=false, ...)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end-of-text token
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # auto (default with tools), none, required, or {"type": "function", "function": ...}
    response_format: dict[str, Any] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    ignore_eos: bool = False
    structure: Structure | None = None  # JSON or a tool call the decoding is held to (structured.py)


@dataclass(frozen=True)
class TextChunk:
    """New output of one choice: text, how many tokens it took, and why it ended (once)."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None


class TextEngine(Protocol[TokenT]):
    """What the layer needs from an engine. A token is whatever the engine counts in: a tokenizer's
    id (transformers) or a word (echo); the layer only counts them and hands them back."""

    max_model_len: int

    def chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                        ) -> list[TokenT]: ...

    def prompt_ids(self, prompt: str) -> list[TokenT]: ...

    def generate(self, prompt_ids: list[TokenT], params: GenerationParams, request_id: str
                 ) -> AsyncIterator[TextChunk]: ...

    async def close(self) -> None: ...


class TokenizerPrompts:
    """Prompt handling from the model's own chat template and tokenizer."""

    tokenizer: Any

    def chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                        ) -> list[int]:
        text = self.tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                                  add_generation_prompt=True)
        return self.prompt_ids(str(text))

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])


# --- validation -----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLimits:
    """What an engine behind this layer cannot do, so that a request asking for it is refused
    (400, code ``unsupported``) instead of silently answered without it."""

    engine: str  # as the refusal names it: "the transformers engine"
    hint: str  # the rest of the refusal: where to get the feature instead
    ignore_eos: bool = True  # whether it can generate past its end of text
    structured: bool = False  # whether it holds decoding to a Structure (tools, JSON): GenerationParams.structure


def check_supported(request: SamplingRequest, limits: EngineLimits) -> None:
    if request.tools and not limits.structured:
        raise bad_request(f"Tool calls are not supported by {limits.engine}; {limits.hint}", "tools", "unsupported")
    kind = (request.response_format or {}).get("type", "text")
    if kind != "text" and not limits.structured:
        raise bad_request(f"response_format {kind!r} is not supported by {limits.engine} (only 'text'); "
                          f"{limits.hint}", "response_format", "unsupported")
    if request.ignore_eos and not limits.ignore_eos:
        raise bad_request(f"ignore_eos is not supported by {limits.engine}; {limits.hint}", "ignore_eos",
                          "unsupported")


def chat_messages(request: ChatRequest) -> list[dict[str, Any]]:
    messages = []
    for message in request.messages:
        content = message.content
        if isinstance(content, list):  # content parts: only text is understood by a text model
            if any(part.get("type") != "text" for part in content):
                raise bad_request("Only text content parts are supported.", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        shaped: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                  "content": content or ""}
        if message.tool_calls:
            shaped["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            shaped["tool_call_id"] = message.tool_call_id
        messages.append(shaped)
    return messages


def calls_tools(request: SamplingRequest) -> bool:
    """Whether the answer may hold tool calls to read back out (tools given, tool_choice not none)."""
    return bool(request.tools) and request.tool_choice != "none"


def completion_prompt(request: CompletionRequest) -> str:
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise bad_request("Send one prompt per request.", "prompt")
    if not prompts[0]:
        raise bad_request("'prompt' must not be empty.", "prompt")
    return prompts[0]


def generation_params(request: SamplingRequest, prompt_tokens: int, max_model_len: int,
                      structure: Structure | None = None) -> GenerationParams:
    """Engine parameters; 400 when the prompt plus the requested tokens cannot fit the context."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise bad_request(f"The prompt is {prompt_tokens} tokens; this model's context is {max_model_len}.",
                          "messages", "context_length_exceeded")
    wanted = request.max_completion_tokens or request.max_tokens
    if wanted is not None and wanted > room:
        raise bad_request(f"max_tokens ({wanted}) plus the prompt ({prompt_tokens} tokens) exceeds the "
                          f"context of {max_model_len} tokens.", "max_tokens", "context_length_exceeded")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise bad_request(f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings.", "stop")
    return GenerationParams(max_tokens=wanted or room, temperature=request.temperature, top_p=request.top_p,
                            n=request.n, stop=stop, seed=request.seed, presence_penalty=request.presence_penalty,
                            frequency_penalty=request.frequency_penalty, ignore_eos=request.ignore_eos,
                            structure=structure)


def stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop sequence starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


# --- responses ---------------------------------------------------------------------------


@dataclass
class Collected:
    texts: dict[int, list[str]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    tokens: int = 0


async def collect(chunks: AsyncIterator[TextChunk], n: int) -> Collected:
    result = Collected(texts={i: [] for i in range(n)})
    async for chunk in chunks:
        result.texts[chunk.index].append(chunk.text)
        result.tokens += chunk.tokens
        if chunk.finish_reason:
            result.finish[chunk.index] = chunk.finish_reason
    return result


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: Literal["chat", "text"], model: str, collected: Collected, prompt_tokens: int,
                    tools: bool = False) -> dict[str, Any]:
    """The answer; with ``tools``, each choice's tool calls read out of its text (finish_reason tool_calls)."""
    choices = []
    for index, parts in sorted(collected.texts.items()):
        text, finish = "".join(parts), collected.finish.get(index, "stop")
        content: dict[str, Any] = ({"message": {"role": "assistant", "content": text}} if kind == "chat"
                                   else {"text": text})
        if tools:
            said, calls = tool_calls_in(text)
            if calls:
                content["message"] = {"role": "assistant", "content": said, "tool_calls": calls}
                finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": index, **content, "finish_reason": finish, "logprobs": None})
    return {"id": _new_id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, collected.tokens)}


async def sse_stream(kind: Literal["chat", "text"], model: str, chunks: AsyncIterator[TextChunk],
                     prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's SSE: one event per chunk, the role first (chat), usage last if asked, then [DONE]."""
    ident, created = _new_id(kind), int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    started: set[int] = set()
    completion_tokens = 0
    try:
        async for chunk in chunks:
            completion_tokens += chunk.tokens
            delta: dict[str, Any] = {"content": chunk.text}
            if kind == "chat" and chunk.index not in started:
                delta["role"] = "assistant"
                started.add(chunk.index)
            choice = ({"index": chunk.index, "delta": delta} if kind == "chat"
                      else {"index": chunk.index, "text": chunk.text})
            choice.update(finish_reason=chunk.finish_reason, logprobs=None)
            yield sse_event({"id": ident, "object": obj, "created": created, "model": model, "choices": [choice]})
    except Exception as exc:  # the engine broke mid-stream: say so instead of ending silently
        yield sse_event(error_body(f"Generation failed: {type(exc).__name__}: {exc}", 500, "generation_failed"))
        raise
    if include_usage:
        yield sse_event({"id": ident, "object": obj, "created": created, "model": model, "choices": [],
                         "usage": usage(prompt_tokens, completion_tokens)})
    yield DONE


async def tool_sse_stream(model: str, chunks: AsyncIterator[TextChunk], n: int, prompt_tokens: int,
                          include_usage: bool) -> AsyncIterator[bytes]:
    """A chat stream that may hold tool calls: the answer is read whole (a call is known only once its
    tags close), then sent as OpenAI streams it: each choice's role, text and tool calls, then its end."""
    try:
        collected = await collect(chunks, n)
    except Exception as exc:
        yield sse_event(error_body(f"Generation failed: {type(exc).__name__}: {exc}", 500, "generation_failed"))
        raise
    body = completion_body("chat", model, collected, prompt_tokens, tools=True)
    frame = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": model}
    for choice in body["choices"]:
        message = choice["message"]
        delta: dict[str, Any] = {"role": "assistant", "content": message["content"]}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        yield sse_event({**frame, "choices": [{"index": choice["index"], "delta": delta, "finish_reason": None,
                                               "logprobs": None}]})
        yield sse_event({**frame, "choices": [{"index": choice["index"], "delta": {},
                                               "finish_reason": choice["finish_reason"], "logprobs": None}]})
    if include_usage:
        yield sse_event({**frame, "choices": [], "usage": body["usage"]})
    yield DONE


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

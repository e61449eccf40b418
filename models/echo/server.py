"""echo: a dependency-free text service that answers with the prompt it was sent.

Not a language model: a diagnostic service for checking a pod end to end (routing,
streaming, swapping) without loading weights. It speaks the OpenAI chat and
completions APIs, streaming included, with whitespace-separated words as "tokens".

    python models/echo/server.py --port 8001 [--token-delay 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from core.base_service import BaseService
from core.errors import ServiceError, bad_request


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send many optional fields
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return " ".join(str(part.get("text", "")) for part in message.content)
    return message.content or ""


class EchoService(BaseService):
    name = "echo"
    default_port = 8001

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
        parser.add_argument("--served-name", default="echo", help="model name reported in responses")
        parser.add_argument("--strict-model-name", action="store_true",
                            help="answer 404 to a `model` other than --served-name, as vLLM's server does")

    async def load(self) -> None:
        self.token_delay: float = self.options.token_delay
        self.served_name: str = self.options.served_name

    def reply_tokens(self, prompt: str, limit: int | None) -> tuple[list[str], str]:
        """The words to answer with, and the finish reason."""
        words = prompt.split() or ["(empty)"]
        if limit is not None and len(words) > limit:
            return words[:limit], "length"
        return words, "stop"

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: ChatRequest) -> dict[str, Any] | StreamingResponse:
            self.check_model(request.model)
            prompt = _text_of(request.messages[-1])
            tokens, finish = self.reply_tokens(prompt, request.token_limit())
            usage = _usage(sum(len(_text_of(m).split()) for m in request.messages), len(tokens))
            if request.stream:
                return self.stream("chat.completion.chunk", tokens, finish, usage, request)
            message = {"role": "assistant", "content": " ".join(tokens)}
            return self.envelope("chat.completion", [{"index": 0, "message": message, "finish_reason": finish}],
                                 usage)

        @app.post("/v1/completions", response_model=None)
        async def completions(request: CompletionRequest) -> dict[str, Any] | StreamingResponse:
            self.check_model(request.model)
            prompt = request.prompt if isinstance(request.prompt, str) else " ".join(request.prompt)
            if not prompt.strip():
                raise bad_request("'prompt' must not be empty.", "prompt")
            tokens, finish = self.reply_tokens(prompt, request.token_limit())
            usage = _usage(len(prompt.split()), len(tokens))
            if request.stream:
                return self.stream("text_completion", tokens, finish, usage, request)
            return self.envelope("text_completion", [{"index": 0, "text": " ".join(tokens), "finish_reason": finish}],
                                 usage)

    def check_model(self, model: str | None) -> None:
        if self.options.strict_model_name and model is not None and model != self.served_name:
            raise ServiceError(404, f"The model `{model}` does not exist.", "model_not_found", param="model")

    def envelope(self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": f"echo-{uuid.uuid4().hex[:12]}", "object": kind, "created": int(time.time()),
                "model": self.served_name, "choices": choices, "usage": usage}

    def stream(self, kind: str, tokens: list[str], finish: str, usage: dict[str, int], request: _Sampling
               ) -> StreamingResponse:
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        return StreamingResponse(self._events(kind, tokens, finish, usage, include_usage),
                                 media_type="text/event-stream")

    async def _events(self, kind: str, tokens: list[str], finish: str, usage: dict[str, int], include_usage: bool
                      ) -> AsyncIterator[bytes]:
        chat = kind == "chat.completion.chunk"
        for i, token in enumerate(tokens):
            text = token if i == 0 else " " + token
            delta: dict[str, Any] = ({"role": "assistant", "content": text} if i == 0 else {"content": text}) \
                if chat else {}
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": text}
            yield _sse(self.envelope(kind, [{**choice, "finish_reason": None}], usage) | {"usage": None})
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
        last = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        yield _sse(self.envelope(kind, [{**last, "finish_reason": finish}], usage) | {"usage": None})
        if include_usage:
            yield _sse(self.envelope(kind, [], usage))
        yield b"data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


__all__ = ["ChatRequest", "CompletionRequest", "EchoService"]

if __name__ == "__main__":
    EchoService().run()

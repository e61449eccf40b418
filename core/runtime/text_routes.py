"""OpenAI's text routes over any ``TextEngine``: chat, completions and the model list.

The one place requests meet an engine of core/runtime/openai_text.py's layer, so the transformers
engine and the echo service answer alike:

    mount_text_routes(app, lambda: self.engine, ["qwen", "q"], EngineLimits(...))
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from core.common.errors import ServiceError, bad_request
from core.runtime import openai_text as oa
from core.runtime.structured import Structure, structure_for

EngineGetter = Callable[[], "oa.TextEngine[Any] | None"]


def mount_text_routes(app: FastAPI, engine: EngineGetter, served_names: Sequence[str], limits: oa.EngineLimits,
                      *, strict_model_name: bool = False, unserved: Mapping[str, Sequence[str]] = {}) -> None:
    """``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` on ``app``; the
    ``unserved`` routes (path → methods: what another engine serves) answer 501, naming ``limits.hint``.

    ``engine`` returns the loaded engine (routes are mounted before it loads). Responses carry the
    first of ``served_names``; any ``model`` is answered unless ``strict_model_name``, where another
    name gets vLLM's 404 ``model_not_found``.
    """
    routes = _TextRoutes(engine, list(served_names), limits, strict_model_name)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: oa.ChatRequest) -> dict[str, Any] | StreamingResponse:
        routes.admit(request)
        structure = structure_for(request.tools, request.tool_choice, request.response_format)
        tools = request.tools if oa.calls_tools(request) else None
        try:
            ids = routes.engine().chat_prompt_ids(oa.chat_messages(request), tools)
        except (ValueError, TypeError) as exc:  # the chat template refused the messages
            raise bad_request(f"Cannot apply the chat template: {exc}", "messages") from None
        return await routes.respond("chat", request, ids, structure)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: oa.CompletionRequest) -> dict[str, Any] | StreamingResponse:
        routes.admit(request)
        if request.tools:
            raise bad_request("Tools are for /v1/chat/completions.", "tools")
        structure = structure_for(None, None, request.response_format)  # JSON answers complete a prompt too
        ids = routes.engine().prompt_ids(oa.completion_prompt(request))
        return await routes.respond("text", request, ids, structure)

    for path, methods in unserved.items():
        app.add_api_route(path, _not_served(path, limits), methods=list(methods), include_in_schema=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "local",
                                            "max_model_len": routes.engine().max_model_len}
                                           for name in routes.served_names]}


def _not_served(path: str, limits: oa.EngineLimits) -> Callable[[], Any]:
    async def refuse() -> None:
        raise ServiceError(501, f"{path} is not served by {limits.engine}; {limits.hint}", "not_implemented")
    return refuse


class _TextRoutes:
    def __init__(self, engine: EngineGetter, served_names: list[str], limits: oa.EngineLimits,
                 strict_model_name: bool) -> None:
        self._engine, self.served_names, self.limits = engine, served_names, limits
        self.strict_model_name = strict_model_name

    def engine(self) -> oa.TextEngine[Any]:
        engine = self._engine()
        assert engine is not None, "engine not loaded"  # the service guard answers 503 until it is
        return engine

    def admit(self, request: oa.SamplingRequest) -> None:
        """Refuse a request for another model (when strict) or for what the engine cannot do."""
        if self.strict_model_name and request.model is not None and request.model not in self.served_names:
            raise ServiceError(404, f"The model `{request.model}` does not exist.", "model_not_found",
                               param="model")
        oa.check_supported(request, self.limits)

    async def respond(self, kind: Literal["chat", "text"], request: oa.SamplingRequest, ids: list[Any],
                      structure: Structure | None = None) -> dict[str, Any] | StreamingResponse:
        engine, model = self.engine(), self.served_names[0]
        params = oa.generation_params(request, len(ids), engine.max_model_len, structure)
        chunks = _watch(engine.generate(ids, params, uuid.uuid4().hex))
        tools = kind == "chat" and oa.calls_tools(request)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            events = (oa.tool_sse_stream(model, chunks, params.n, len(ids), include_usage) if tools
                      else oa.sse_stream(kind, model, chunks, len(ids), include_usage))
            return StreamingResponse(events, media_type="text/event-stream")
        return oa.completion_body(kind, model, await oa.collect(chunks, params.n), len(ids), tools)


async def _watch(chunks: AsyncIterator[oa.TextChunk]) -> AsyncIterator[oa.TextChunk]:
    """The engine's chunks, its generator closed as soon as the response ends (a client gone stops it)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]

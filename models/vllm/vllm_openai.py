"""vLLM's own OpenAI layer in front of the service's AsyncLLM.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` are answered by vLLM's serving
classes (OpenAIServingChat, OpenAIServingCompletion, OpenAIServingModels), constructed with the
arguments ``vllm serve`` gives them (``init_app_state`` in
``vllm.entrypoints.launchers.api_server.app_state``, ``init_generate_state`` in
``vllm.entrypoints.generate.api_router``): tool calls and their parsers, ``response_format``
(structured outputs), logprobs, the model's generation-config defaults, vLLM's request
validation, error envelopes and strict model names.

They live in a small FastAPI app of their own, with vLLM's exception handlers (which read
``request.app.state``), built once the engine exists; the service's app forwards the three
paths to it, so ``/health``, the readiness gate, the concurrency cap and the cancel-on-disconnect
guard of ``BaseService`` stay in front. ``/v1/models`` is vLLM's router; the two generation
routes mirror vLLM's (see ``_add_generation_routes`` for why).

One change to vLLM's behaviour: a request the engine aborts (``finish_reason`` "abort", e.g. the
engine stopping under it) is reported as an error (an error event in a stream, a 500 otherwise),
never as a completed answer.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from core.errors import error_bytes

ASGIApp = Callable[..., Any]
ABORTED = "The engine aborted this request before it finished: the answer was cut off."
PATHS = {"/v1/chat/completions": ["POST"], "/v1/completions": ["POST"], "/v1/models": ["GET"]}


class Forwarder:
    """The ASGI endpoint the service's app routes ``PATHS`` to: vLLM's app once it is built."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.app is None:  # the readiness gate answers first; this covers a request racing the build
            body = error_bytes("The vLLM engine is not loaded.", 503, "model_not_ready")
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


async def build_app(engine: Any, args: argparse.Namespace, on_engine_dead: Callable[[str], None]) -> Any:
    """vLLM's FastAPI app for the three routes, its state built from ``engine`` and ``args``."""
    from fastapi import FastAPI
    from vllm.entrypoints.openai.models.api_router import attach_router as attach_models
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    state = app.state
    state.args = args  # the exception handlers read options from it
    state.engine_client = engine
    state.server = _FatalOnExit(on_engine_dead)  # vLLM's engine-error handler stops "the server" through it
    await _init_serving(state, engine, args)
    _add_generation_routes(app)
    attach_models(app)
    init_exception_handler(app)
    return app


def _add_generation_routes(app: Any) -> None:
    """The chat and completion routes of vLLM's routers (``vllm.entrypoints.openai.*.api_router``).

    Mirrored rather than attached: vLLM's ``with_cancellation`` runs the handler in a task of its
    own, which BaseService's guard cannot cancel when the client disconnects (the generation would
    go on). Here the handler runs in the request's task, so the guard's cancellation reaches
    AsyncLLM.generate, which aborts the request in the engine.
    """
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse

    async def chat(raw_request: Request) -> Response:
        request = await _parse(raw_request, ChatCompletionRequest)
        return _respond(app, await app.state.openai_serving_chat.create_chat_completion(request, raw_request),
                        ChatCompletionResponse)

    async def completions(raw_request: Request) -> Response:
        request = await _parse(raw_request, CompletionRequest)
        return _respond(app, await app.state.openai_serving_completion.create_completion(request, raw_request),
                        CompletionResponse)

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])


async def _parse(raw_request: Request, model: Any) -> Any:
    """The body as vLLM's request model; errors reach vLLM's handlers as FastAPI would raise them."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from vllm.entrypoints.serve.utils.api_utils import validate_json_request

    await validate_json_request(raw_request)  # vLLM's dependency: 400 unless application/json
    try:
        return model.model_validate(await raw_request.json())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _respond(app: Any, result: Any, complete: type[Any]) -> Response:
    """An error, a whole answer, or a stream, as vLLM's routes return them."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive

    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if isinstance(result, complete):
        return JSONResponse(result.model_dump())
    interval = float(getattr(app.state.args, "sse_keep_alive_interval", 0))
    return StreamingResponse(with_sse_keep_alive(result, interval), media_type="text/event-stream")


async def _init_serving(state: Any, engine: Any, args: argparse.Namespace) -> None:
    """The serving objects, with the arguments ``init_app_state`` / ``init_generate_state`` give them."""
    from vllm.entrypoints.launchers.cli_args import resolve_default_chat_template_kwargs
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.utils.request_logger import RequestLogger
    from vllm.renderers.chat_utils import load_chat_template

    if args.tool_call_parser is not None:
        from vllm.parser.metrics import init_parser_metrics

        init_parser_metrics(model_name=args.served_model_name[0])
    logger = RequestLogger(max_log_len=args.max_log_len) if args.enable_log_requests else None
    template = load_chat_template(args.chat_template)
    template_kwargs = resolve_default_chat_template_kwargs(args)
    state.openai_serving_models = OpenAIServingModels(
        engine_client=engine, base_model_paths=[BaseModelPath(name=name, model_path=args.model)
                                                for name in args.served_model_name])
    await state.openai_serving_models.init_static_loras()
    state.online_renderer = _renderer(engine, args, logger, template, template_kwargs)
    chat, completion = _serving_classes()
    state.openai_serving_chat = chat(
        engine_client=engine, models=state.openai_serving_models, response_role=args.response_role,
        online_renderer=state.online_renderer, request_logger=logger, chat_template=template,
        chat_template_content_format=args.chat_template_content_format,
        default_chat_template_kwargs=template_kwargs, trust_request_chat_template=args.trust_request_chat_template,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids, enable_auto_tools=args.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        tool_parser=args.tool_call_parser, tool_strict_level=args.tool_strict_level,
        reasoning_parser=args.structured_outputs_config.reasoning_parser,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_force_include_usage=args.enable_force_include_usage, enable_log_outputs=args.enable_log_outputs,
        enable_log_deltas=args.enable_log_deltas, enable_per_request_metrics=args.enable_per_request_metrics,
    )
    state.openai_serving_completion = completion(
        engine, state.openai_serving_models, online_renderer=state.online_renderer, request_logger=logger,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_force_include_usage=args.enable_force_include_usage,
        enable_per_request_metrics=args.enable_per_request_metrics,
    )


def _renderer(engine: Any, args: argparse.Namespace, logger: Any, template: str | None,
              template_kwargs: dict[str, Any]) -> Any:
    """vLLM's OnlineRenderer (chat template, tools, request rendering), warmed up as vLLM does."""
    from vllm.renderers.online_renderer import OnlineRenderer

    renderer = OnlineRenderer(
        model_config=engine.model_config, renderer=engine.renderer, request_logger=logger, chat_template=template,
        chat_template_content_format=args.chat_template_content_format,
        trust_request_chat_template=args.trust_request_chat_template,
        trust_request_mm_kwargs=args.trust_request_mm_kwargs, enable_auto_tools=args.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        tool_parser=args.tool_call_parser, tool_strict_level=args.tool_strict_level,
        reasoning_parser=args.structured_outputs_config.reasoning_parser,
        default_chat_template_kwargs=template_kwargs, log_error_stack=args.log_error_stack,
    )
    renderer.warmup()
    return renderer


def _serving_classes() -> tuple[type[Any], type[Any]]:
    """vLLM's chat and completion serving classes, with "abort" reported as an error."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.exceptions import GenerationError

    def raise_if_error(finish_reason: str | None) -> None:
        # vLLM passes "abort" through as a finish_reason; a cut-off answer must not look finished.
        if finish_reason == "abort":
            raise GenerationError(ABORTED)

    class Chat(OpenAIServingChat):  # type: ignore[misc]
        def _raise_if_error(self, finish_reason: str | None, request_id: str) -> None:
            raise_if_error(finish_reason)
            super()._raise_if_error(finish_reason, request_id)

    class Completion(OpenAIServingCompletion):  # type: ignore[misc]
        def _raise_if_error(self, finish_reason: str | None, request_id: str) -> None:
            raise_if_error(finish_reason)
            super()._raise_if_error(finish_reason, request_id)

    return Chat, Completion


class _FatalOnExit:
    """Stands in for the uvicorn server that vLLM's engine-error handler stops when the engine is
    dead: here that is fatal for the service (it exits non-zero and the orchestrator restarts it)."""

    def __init__(self, fatal: Callable[[str], None]) -> None:
        self._fatal = fatal

    @property
    def should_exit(self) -> bool:
        return False

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._fatal("vLLM's engine is dead")


async def warmup(app: Any) -> None:
    """One single-token chat completion through vLLM's layer: template, tokenizer and engine all run once."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    reply = await app.state.openai_serving_chat.create_chat_completion(request, None)
    if isinstance(reply, ErrorResponse):
        raise RuntimeError(f"warm-up request failed: {reply.error.message}")

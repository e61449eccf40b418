"""vLLM's own OpenAI layer in front of the service's AsyncLLM.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` are answered by vLLM's serving
classes (OpenAIServingChat, OpenAIServingCompletion, OpenAIServingModels), constructed with the
arguments ``vllm serve`` gives them (``init_app_state`` in
``vllm.entrypoints.launchers.api_server.app_state``, ``init_generate_state`` in
``vllm.entrypoints.generate.api_router``): tool calls and their parsers, ``response_format``
(structured outputs), logprobs, the model's generation-config defaults, vLLM's request
validation, error envelopes and strict model names.

The Responses and Messages APIs and tokenize are vLLM's too (models/vllm/vllm_apis.py).

They live in a small FastAPI app of their own, with vLLM's exception handlers (which read
``request.app.state``), built once the engine exists; the service's app forwards ``PATHS`` to it,
so ``/health``, the readiness gate, the concurrency cap and the cancel-on-disconnect guard of
``BaseService`` stay in front. ``/v1/models`` is vLLM's router; the generation routes mirror
vLLM's (see ``_add_generation_routes`` for why).

One change to vLLM's behaviour: a request the engine aborts (``finish_reason`` "abort", e.g. the
engine stopping under it) is reported as an error (an error event in a stream, a 500 otherwise),
never as a completed answer.

vLLM 0.32 and 0.16 (the two lines of core/host/gpu_stack.STACKS) keep these classes in different
modules and construct them differently; ``releases`` says where, ``serving_options`` how.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from core.common.errors import error_bytes
from models.vllm import releases, vllm_apis, vllm_body

ASGIApp = Callable[..., Any]
ABORTED = "The engine aborted this request before it finished: the answer was cut off."
PATHS = {"/v1/chat/completions": ["POST"], "/v1/completions": ["POST"], "/v1/models": ["GET"], **vllm_apis.PATHS}


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


async def build_app(engine: Any, args: argparse.Namespace, on_engine_dead: Callable[[str], None],
                    line: str | None = None, store_limit: int = vllm_apis.STORE_LIMIT) -> Any:
    """vLLM's FastAPI app for ``PATHS``, its state built from ``engine`` and ``args``; the newest
    ``store_limit`` responses of the Responses API are kept (vllm_apis.py)."""
    from fastapi import FastAPI

    line = line or releases.installed_line()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    state = app.state
    state.args = args  # the exception handlers read options from it
    state.engine_client = engine
    state.server = _FatalOnExit(on_engine_dead)  # vLLM's engine-error handler stops "the server" through it
    await _init_serving(state, engine, args, line, store_limit)
    _add_generation_routes(app, line)
    vllm_apis.add_routes(app, line)
    releases.load("attach_models_router", line)(app)
    _add_exception_handlers(app, line)
    return app


def _add_exception_handlers(app: Any, line: str) -> None:
    """vLLM's handlers: 0.32 registers them in one call; 0.16's ``vllm serve`` does it one by one."""
    if releases.has("init_exception_handler", line):
        releases.load("init_exception_handler", line)(app)
        return
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError

    app.exception_handler(HTTPException)(releases.load("http_exception_handler", line))
    app.exception_handler(RequestValidationError)(releases.load("validation_exception_handler", line))
    releases.load("add_shutdown_handlers", line)(app, app.state.server)


def _add_generation_routes(app: Any, line: str) -> None:
    """The chat and completion routes of vLLM's routers (``vllm.entrypoints.openai.*.api_router``).

    Mirrored rather than attached: vLLM's ``with_cancellation`` runs the handler in a task of its
    own, which BaseService's guard cannot cancel when the client disconnects (the generation would
    go on). Here the handler runs in the request's task, so the guard's cancellation reaches
    AsyncLLM.generate, which aborts the request in the engine. What the handlers use of vLLM is
    looked up here, once, not per request.
    """
    load = functools.partial(releases.load, line=line)
    chat_request, chat_response = load("ChatCompletionRequest"), load("ChatCompletionResponse")
    completion_request, completion_response = load("CompletionRequest"), load("CompletionResponse")
    parse = functools.partial(vllm_body.parse, validate=load("validate_json_request"))
    keep_alive = load("with_sse_keep_alive") if releases.has("with_sse_keep_alive", line) else None  # not in 0.16
    respond = functools.partial(_respond, app, error=load("ErrorResponse"), keep_alive=keep_alive)

    async def chat(raw_request: Request) -> Response:
        request = await parse(raw_request, chat_request.model_validate)
        return respond(await app.state.openai_serving_chat.create_chat_completion(request, raw_request),
                       chat_response)

    async def completions(raw_request: Request) -> Response:
        request = await parse(raw_request, completion_request.model_validate)
        return respond(await app.state.openai_serving_completion.create_completion(request, raw_request),
                       completion_response)

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])


def _respond(app: Any, result: Any, complete: type[Any], error: type[Any], keep_alive: Callable[..., Any] | None
             ) -> Response:
    """An error, a whole answer, or a stream, as vLLM's routes return them."""
    if isinstance(result, error):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if isinstance(result, complete):
        return JSONResponse(result.model_dump())
    if keep_alive is not None:
        result = keep_alive(result, float(getattr(app.state.args, "sse_keep_alive_interval", 0)))
    return StreamingResponse(result, media_type="text/event-stream")


async def _init_serving(state: Any, engine: Any, args: argparse.Namespace, line: str, store_limit: int) -> None:
    """The serving objects, with the arguments ``init_app_state`` / ``init_generate_state`` give them."""
    load = functools.partial(releases.load, line=line)
    if args.tool_call_parser is not None and releases.has("init_parser_metrics", line):
        load("init_parser_metrics")(model_name=args.served_model_name[0])
    logger = load("RequestLogger")(max_log_len=args.max_log_len) if args.enable_log_requests else None
    template = load("load_chat_template")(args.chat_template)
    template_kwargs = (load("resolve_default_chat_template_kwargs")(args)
                       if releases.has("resolve_default_chat_template_kwargs", line)
                       else args.default_chat_template_kwargs)
    paths = [load("BaseModelPath")(name=name, model_path=args.model) for name in args.served_model_name]
    state.openai_serving_models = load("OpenAIServingModels")(engine_client=engine, base_model_paths=paths)
    await state.openai_serving_models.init_static_loras()
    renderer = None
    if releases.has("OnlineRenderer", line):  # 0.32; 0.16 renders inside OpenAIServingChat
        renderer = load("OnlineRenderer")(model_config=engine.model_config, renderer=engine.renderer,
                                          **renderer_options(args, logger, template, template_kwargs))
        renderer.warmup()
    state.online_renderer = renderer
    chat_options, completion_options = serving_options(line, args, logger, template, template_kwargs, renderer)
    chat, completion = _serving_classes(line)
    state.openai_serving_chat = chat(engine_client=engine, models=state.openai_serving_models,
                                     response_role=args.response_role, **chat_options)
    state.openai_serving_completion = completion(engine, state.openai_serving_models, **completion_options)
    if renderer is None:
        await state.openai_serving_chat.warmup()  # as 0.16's init_generate_state does
    options = vllm_apis.serving_options(line, args, logger, template, template_kwargs, renderer)
    vllm_apis.init_state(state, engine, args, line, options, renderer, store_limit)


def renderer_options(args: Any, logger: Any, template: str | None, template_kwargs: Any) -> dict[str, Any]:
    """OnlineRenderer's options (vLLM 0.32), as ``init_app_state`` gives them."""
    return dict(
        request_logger=logger, chat_template=template,
        chat_template_content_format=args.chat_template_content_format,
        trust_request_chat_template=args.trust_request_chat_template,
        trust_request_mm_kwargs=args.trust_request_mm_kwargs, enable_auto_tools=args.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        tool_parser=args.tool_call_parser, tool_strict_level=args.tool_strict_level,
        reasoning_parser=args.structured_outputs_config.reasoning_parser,
        default_chat_template_kwargs=template_kwargs, log_error_stack=args.log_error_stack,
    )


def serving_options(line: str, args: Any, logger: Any, template: str | None, template_kwargs: Any,
                    renderer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keyword options of OpenAIServingChat and OpenAIServingCompletion in ``line``, as that
    release's ``vllm serve`` gives them (models/vllm/surface.py checks them against its source)."""
    common = dict(request_logger=logger, return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                  enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                  enable_force_include_usage=args.enable_force_include_usage)
    chat = dict(
        common, chat_template=template, chat_template_content_format=args.chat_template_content_format,
        default_chat_template_kwargs=template_kwargs, trust_request_chat_template=args.trust_request_chat_template,
        enable_auto_tools=args.enable_auto_tool_choice, tool_parser=args.tool_call_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        reasoning_parser=args.structured_outputs_config.reasoning_parser,
        enable_log_outputs=args.enable_log_outputs, enable_log_deltas=args.enable_log_deltas,
    )
    if line == releases.OLD:  # no renderer, per-request metrics or tool strictness; each logs its own errors
        return dict(chat, log_error_stack=args.log_error_stack), dict(common, log_error_stack=args.log_error_stack)
    new = dict(online_renderer=renderer, enable_per_request_metrics=args.enable_per_request_metrics)
    return dict(chat, **new, tool_strict_level=args.tool_strict_level), dict(common, **new)


def _serving_classes(line: str | None = None) -> tuple[type[Any], type[Any]]:
    """vLLM's chat and completion serving classes, with "abort" reported as an error."""
    line = line or releases.installed_line()
    base_chat, base_completion, generation_error = (
        releases.load(name, line) for name in ("OpenAIServingChat", "OpenAIServingCompletion", "GenerationError"))

    def raise_if_error(finish_reason: str | None) -> None:
        # vLLM passes "abort" through as a finish_reason; a cut-off answer must not look finished.
        if finish_reason == "abort":
            raise generation_error(ABORTED)

    class Chat(base_chat):  # type: ignore[misc,valid-type]
        def _raise_if_error(self, finish_reason: str | None, request_id: str) -> None:
            raise_if_error(finish_reason)
            super()._raise_if_error(finish_reason, request_id)

    class Completion(base_completion):  # type: ignore[misc,valid-type]
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
    request = releases.load("ChatCompletionRequest")(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    reply = await app.state.openai_serving_chat.create_chat_completion(request, None)
    if isinstance(reply, releases.load("ErrorResponse")):
        raise RuntimeError(f"warm-up request failed: {reply.error.message}")

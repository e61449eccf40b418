"""Request bodies as vLLM's routes read them: the shared step of the mirrored routes (vllm_openai.py, vllm_apis.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request


async def parse(raw_request: Request, validate_body: Callable[[Any], Any], validate: Callable[[Request], Any]) -> Any:
    """The JSON body as vLLM's request type (``validate_body``: a model's ``model_validate``, or a
    TypeAdapter's ``validate_python`` for vLLM's union types); errors reach vLLM's exception handlers
    as FastAPI would raise them, so the client gets vLLM's own 400 envelope."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    await validate(raw_request)  # vLLM's dependency: 400 unless application/json
    try:
        return validate_body(await raw_request.json())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None

"""FastAPI exception handlers that answer every error with an OpenAI envelope."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ServiceError, error_body

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI envelope: ServiceError as raised, validation → 400, crash → 500."""

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        reason = first.get("msg", "invalid")
        message = f"Invalid value for '{param}': {reason}" if param else f"Invalid request: {reason}"
        return JSONResponse(error_body(message, 400, "invalid_value", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), exc.status_code, code), exc.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", 500, "internal_error"), 500)

"""FastAPI exception handlers that answer every error with an OpenAI envelope."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.common.errors import ServiceError, error_body

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI, owner: str | None = None) -> None:
    """Every error as an OpenAI envelope: ServiceError as raised, validation → 400, crash → 500.

    With ``owner`` (a model's name), a request for a route the app does not have gets a 404 that
    names the model and the routes it does serve, rather than a bare "Not Found": the likely
    mistake is a model sent to the wrong endpoint (a classifier asked for a chat completion).
    """

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
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if owner is not None and exc.status_code == 404 and message == "Not Found":
            message = not_served_message(owner, request.method, request.url.path, public_routes(app))
            code = "route_not_served"
        return JSONResponse(error_body(message, exc.status_code, code), exc.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", 500, "internal_error"), 500)


def public_routes(app: FastAPI) -> list[str]:
    """"METHOD /path" for each route the app serves to clients, in the order they were added: those
    in its schema but /health (so not the orchestrator's park calls, nor the docs)."""
    found = []
    for route in app.routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path is None or not methods or path == "/health" or not getattr(route, "include_in_schema", True):
            continue
        found += [f"{method} {path}" for method in sorted(methods - {"HEAD", "OPTIONS"})]
    return found


def not_served_message(owner: str, method: str, path: str, routes: list[str]) -> str:
    serves = ", ".join(routes) if routes else "no client routes"
    return f"The model {owner!r} does not serve {method} {path}; it serves {serves}."

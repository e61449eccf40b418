"""OpenAI-style error envelopes, shared by every model service and the orchestrator.

Every error this project produces has the shape OpenAI clients understand::

    {"error": {"message": "...", "type": "...", "code": "...", "param": null}}

The official ``openai`` package maps the HTTP status to its exception class
(404 → ``NotFoundError``, 429 → ``RateLimitError``, ...), so the status matters as
much as the body.
"""

from __future__ import annotations

import json
from typing import Any

# OpenAI's own error types by status; anything else falls back by class (4xx / 5xx).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    """The OpenAI ``type`` string for an HTTP status."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(
    message: str, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The envelope as a dict (for frameworks that serialise themselves)."""
    return {"error": {"message": message, "type": error_type_for(status), "code": code, "param": param}}


def error_bytes(message: str, status: int, code: str | None = None, param: str | None = None) -> bytes:
    """The envelope as JSON bytes (for the raw ASGI data path)."""
    return json.dumps(error_body(message, status, code, param)).encode()


class ServiceError(Exception):
    """An error that should reach the client as an OpenAI envelope with this status.

    Raise it anywhere in a model service or the orchestrator; the HTTP layer turns it
    into the envelope. ``retry_after`` (seconds) becomes a ``Retry-After`` header.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.code, self.param)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after)))}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ServiceError:
    """Shorthand for the most common service error: a 400 naming the bad parameter."""
    return ServiceError(400, message, code, param=param)

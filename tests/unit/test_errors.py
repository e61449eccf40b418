"""The OpenAI error envelope and ServiceError's status, body and Retry-After header."""

from __future__ import annotations

import json

import pytest

from core.common.errors import ServiceError, bad_request, error_body, error_bytes, error_type_for


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "conflict_error"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (418, "invalid_request_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_error_type_for_status(status: int, kind: str) -> None:
    assert error_type_for(status) == kind
    assert error_body("m", status)["error"]["type"] == kind


def test_error_body_shape() -> None:
    assert error_body("no such model", 404, "model_not_found", "model") == {
        "error": {"message": "no such model", "type": "not_found_error", "code": "model_not_found", "param": "model"}
    }


def test_error_body_defaults_to_null_code_and_param() -> None:
    assert error_body("boom", 500) == {
        "error": {"message": "boom", "type": "server_error", "code": None, "param": None}
    }


def test_error_bytes_is_the_body_as_json() -> None:
    raw = error_bytes('bad "quote" ü', 429, "rate_limited")
    assert isinstance(raw, bytes)
    assert json.loads(raw) == error_body('bad "quote" ü', 429, "rate_limited")
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"


def test_service_error_fields_and_body() -> None:
    err = ServiceError(503, "busy", "queue_full", param="model", retry_after=5)
    assert str(err) == "busy"
    assert (err.status, err.message, err.code, err.param, err.retry_after) == (503, "busy", "queue_full", "model", 5)
    assert err.body() == error_body("busy", 503, "queue_full", "model")
    assert err.body()["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(5, "5"), (2.4, "2"), (2.6, "3"), (0.2, "1"), (0, "1"), (-3, "1"), (299.9, "300")],
)
def test_retry_after_header_rounded_and_at_least_one(retry_after: float, header: str) -> None:
    assert ServiceError(503, "x", retry_after=retry_after).headers() == {"retry-after": header}


def test_no_retry_after_no_headers() -> None:
    assert ServiceError(404, "x").headers() == {}


def test_bad_request_shorthand() -> None:
    err = bad_request("temperature must be >= 0", param="temperature")
    assert (err.status, err.code, err.param) == (400, "invalid_value", "temperature")
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert bad_request("x", code="too_long").code == "too_long"

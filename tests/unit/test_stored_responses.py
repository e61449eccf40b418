"""Which requests are a stored response's (GET by id, cancel), and the bounded store the text service keeps them in."""

from __future__ import annotations

import pytest

from model_orchestrator.stored_responses import stored_response_id
from models.vllm.vllm_apis import Bounded


@pytest.mark.parametrize(("method", "path", "found"), [
    ("GET", "/v1/responses/resp_1", "resp_1"),
    ("POST", "/v1/responses/resp_1/cancel", "resp_1"),
    ("GET", "/v1/responses/resp_1/cancel", None),  # cancel is a POST
    ("POST", "/v1/responses/resp_1", None),  # nothing to post to a stored response
    ("DELETE", "/v1/responses/resp_1", None),
    ("POST", "/v1/responses/resp_1/restore", None),
    ("POST", "/v1/responses/resp_1/cancel/x", None),
    ("GET", "/v1/responses/", None),
    ("POST", "/v1/responses//cancel", None),
    ("GET", "/v1/responsesX/resp_1", None),
])
def test_stored_response_id(method: str, path: str, found: str | None) -> None:
    assert stored_response_id(method, path) == found


def test_the_store_forgets_its_oldest_past_its_limit_and_says_which() -> None:
    forgotten: list[object] = []
    store = Bounded(2, forgotten.append)
    for key in ("a", "b", "c"):
        store[key] = key.upper()
    store["b"] = "B2"  # replacing keeps the count
    assert dict(store) == {"b": "B2", "c": "C"} and forgotten == ["a"]
    store["d"] = "D"
    assert list(store) == ["c", "d"] and forgotten == ["a", "b"]

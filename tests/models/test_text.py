"""The text service on the transformers engine (the hand-written OpenAI layer), with the tiny Qwen2 model.

The vLLM engine (vLLM's own OpenAI layer) is tested in test_text_vllm.py, its start, drain and
engine death in test_text_vllm_lifecycle.py, and both on a GPU in test_text_gpu.py. A client that
hangs up mid-generation: tests/models/test_worker_cancel.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from tests.models import text_cases
from tests.models.text_cases import TextService, text_service

pytest.importorskip("transformers")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture(scope="module")
def service(tiny_text: Path) -> Iterator[TextService]:
    with text_service("--model", str(tiny_text), "--engine", "transformers") as running:
        yield running


class TestTransformersApi(text_cases.TextApiCases):
    names: ClassVar[list[str]] = ["tiny-qwen"]  # no --served-model-name: the model folder's name
    max_model_len = 1024


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"max_tokens": 100_000}, "max_tokens", "context_length_exceeded"),
    ({"temperature": 5}, "temperature", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
])
def test_bad_requests_get_the_projects_envelope_naming_the_param(service: TextService, fields: dict[str, Any],
                                                                 param: str, code: str) -> None:
    reply = text_cases.chat(service.url, **fields)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_any_model_name_is_answered_under_the_served_name(service: TextService) -> None:
    # Lenient on purpose: the orchestrator passes aliases through unchanged (models.demo.yaml's gpt-4o-mini).
    reply = text_cases.chat(service.url, model="gpt-4o-mini", max_tokens=1)
    assert reply.status_code == 200 and reply.json()["model"] == "tiny-qwen"


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/responses"), ("GET", "/v1/responses/resp_1"),
                                              ("POST", "/v1/messages"), ("POST", "/tokenize")])
def test_what_only_the_vllm_engine_serves_is_a_501_that_says_so(service: TextService, method: str, path: str) -> None:
    reply = httpx.request(method, service.url + path, json={"model": "tiny-qwen"}, timeout=30)
    assert reply.status_code == 501, reply.text
    error = reply.json()["error"]
    assert error["code"] == "not_implemented" and error["message"].startswith(path.replace("resp_1", "{response_id}"))
    assert "not served by the transformers engine" in error["message"] and "--engine vllm" in error["message"]


def test_importing_the_server_does_not_import_heavy_packages() -> None:
    code = ("import sys, models.vllm.server, models.vllm.engine_vllm, models.vllm.vllm_openai; "
            "assert not {'torch', 'vllm', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

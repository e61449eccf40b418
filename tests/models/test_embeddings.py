"""The embeddings service as a real process with the packaged all-MiniLM-L6-v2, over HTTP and via openai."""

from __future__ import annotations

import base64
import math
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from models.embeddings.server import HUB_MODEL, packaged_model
from tests.integration.conftest import REPO, running_service
from tests.models.hf_cache import hub_snapshot

pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.integration

SCRIPT = "models/embeddings/server.py"
FOOD, BREAD, ALIENS = ("A man is eating food.", "A man is eating a piece of bread.",
                       "The new movie is awesome about space aliens.")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_service(SCRIPT) as (_, base):
        yield base


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json=body, timeout=60)


def embed(url: str, texts: str | list[str], **body: Any) -> list[list[float]]:
    response = post(url, input=texts, **body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(data)))
    return [item["embedding"] for item in data]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def cosine(a: list[float], b: list[float]) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def decode(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_shape_and_unit_length(url: str) -> None:
    response = post(url, input="Hello, world!", model="all-minilm", user="someone", extra_field=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "all-minilm"
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    assert abs(dot(item["embedding"], item["embedding"]) - 1) < 1e-5
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_model_defaults_to_service_name(url: str) -> None:
    assert post(url, input="hi").json()["model"] == "embeddings"


def test_openai_client_base64_and_similarity(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    result = client.embeddings.create(model="all-minilm", input=[FOOD, BREAD, ALIENS])  # base64 by default
    assert result.model == "all-minilm"
    assert [d.index for d in result.data] == [0, 1, 2]
    food, bread, aliens = (d.embedding for d in result.data)
    assert all(len(v) == 384 and abs(dot(v, v) - 1) < 1e-5 for v in (food, bread, aliens))
    assert cosine(food, bread) > cosine(food, aliens) + 0.3
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0


def test_openai_client_float_and_dimensions(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    result = client.embeddings.create(model="m", input=FOOD, encoding_format="float", dimensions=128)
    [item] = result.data
    assert len(item.embedding) == 128 and abs(dot(item.embedding, item.embedding) - 1) < 1e-5


def test_list_keeps_order_and_matches_single_inputs(url: str) -> None:
    texts = [ALIENS, "short", FOOD, "a somewhat longer sentence that pads the batch " * 3]
    batch = embed(url, texts)
    for text, vector in zip(texts, batch, strict=True):
        [single] = embed(url, text)
        assert max(abs(a - b) for a, b in zip(vector, single, strict=True)) < 1e-5


def test_float_and_base64_agree(url: str) -> None:
    floats = embed(url, [FOOD, BREAD], encoding_format="float")
    encoded = embed(url, [FOOD, BREAD], encoding_format="base64")
    assert all(isinstance(e, str) for e in encoded)
    assert [decode(str(e)) for e in encoded] == floats


def test_usage_grows_with_input(url: str) -> None:
    def tokens(text: str | list[str]) -> int:
        usage = post(url, input=text).json()["usage"]
        assert usage["prompt_tokens"] == usage["total_tokens"]
        return int(usage["prompt_tokens"])

    short, longer = tokens("hello"), tokens("hello there, how are you doing on this fine day?")
    assert 0 < short < longer
    assert tokens(["hello", "hello"]) == 2 * short


def test_dimensions_truncates_and_renormalizes(url: str) -> None:
    [full] = embed(url, FOOD)
    [short] = embed(url, FOOD, dimensions=128)
    assert len(short) == 128 and abs(dot(short, short) - 1) < 1e-5
    assert cosine(short, full[:128]) > 0.99999
    assert len(embed(url, FOOD, dimensions=384)[0]) == 384


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [""]}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": [1, 2, 3]}, "input"),
    ({"input": [[1, 2], [3]]}, "input"),
    ({"input": None}, "input"),
    ({"input": {"text": "x"}}, "input"),
    ({"input": ["ok", 5]}, "input"),
    ({}, "input"),
    ({"input": ["x"] * 257}, "input"),
    ({"input": "x" * 100_001}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "dimensions": 10000}, "dimensions"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": "many"}, "dimensions"),
])
def test_bad_requests(url: str, body: dict[str, Any], param: str) -> None:
    response = httpx.post(url + "/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_token_arrays_message(url: str) -> None:
    error = post(url, input=[101, 2023, 102]).json()["error"]
    assert "token arrays are not supported" in error["message"]


def test_openai_client_sees_bad_request(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="m", input="x", dimensions=10000)
    assert caught.value.param == "dimensions"


def test_still_healthy_after_errors(url: str) -> None:
    assert post(url, input=[]).status_code == 400
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert "all-MiniLM-L6-v2" in health.json()["model"]
    assert len(embed(url, ["still", "working"])) == 2


def test_options_no_normalize_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIO_VRAM_GB", "1")  # as the orchestrator sets it from vram_gb: unused on CPU
    with running_service(SCRIPT, "--no-normalize", "--max-batch", "2", "--max-input-chars", "50",
                         "--device", "cpu") as (proc, url):
        [short] = embed(url, FOOD, dimensions=128)
        assert len(short) == 128 and dot(short, short) < 0.99  # truncated, not re-normalized
        assert post(url, input=["a", "b", "c"]).json()["error"]["param"] == "input"
        assert post(url, input="x" * 51).status_code == 400
        assert len(embed(url, ["a", "x" * 50])) == 2
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        assert "GPU share 1 GiB not applied: the model runs on cpu" in proc.stdout.read().decode()


def test_hub_id_from_the_hf_cache_offline(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU profile passes the hub id with HF_HUB_OFFLINE=1 and a cache the playbook filled; here the
    # cache holds the packaged model's files (the hub repo's, less its other weight formats).
    packaged = packaged_model()
    assert packaged is not None
    hf_home = tmp_path / "hf"
    hub_snapshot(hf_home, HUB_MODEL, packaged)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    with running_service(SCRIPT, "--model", HUB_MODEL) as (_, hub_url):
        assert httpx.get(hub_url + "/health", timeout=10).json()["model"] == HUB_MODEL
        from_hub = embed(hub_url, [FOOD, BREAD])
    for a, b in zip(from_hub, embed(url, [FOOD, BREAD]), strict=True):  # the packaged default: same model
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6


def test_import_does_not_load_torch() -> None:
    code = ("import sys, models.embeddings.server as s; "
            "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers', 'all_minilm_l6_v2') "
            "if m in sys.modules]; assert not heavy, heavy; print(s.EmbeddingsService.default_port)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8004"


@pytest.mark.gpu
def test_cuda_matches_cpu(url: str) -> None:
    texts = [FOOD, BREAD, ALIENS]
    cpu = embed(url, texts)
    with running_service(SCRIPT, "--device", "cuda") as (_, gpu_url):
        for a, b in zip(cpu, embed(gpu_url, texts), strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3

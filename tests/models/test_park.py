"""Parking the torch services (core/runtime/host_copy.py): real processes with tiny models, over HTTP.

Each service renders with a fixed seed, parks (``POST /offload``), refuses data requests while
parked, restores, and must then give byte-identical output. The text service's transformers
engine is driven in this process, as models/vllm/server.py drives it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import REPO
from tests.models.service_log import Service, followed
from tests.models.test_whisper import tone

pytest.importorskip("diffusers")
pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Request:
    """One fixed-seed request to a service's data route, and the bytes of its output to compare."""

    path: str
    body: dict[str, Any]
    output: Callable[[httpx.Response], bytes]
    upload: tuple[str, bytes] | None = None  # a file: the body's fields go as a form with it

    def send(self, url: str) -> httpx.Response:
        if self.upload is not None:
            return httpx.post(url + self.path, data=self.body, files={"file": self.upload}, timeout=120)
        return httpx.post(url + self.path, json=self.body, timeout=120)


def first_image(response: httpx.Response) -> bytes:
    return base64.b64decode(response.json()["data"][0]["b64_json"])  # the PNG file


def float32_bytes(response: httpx.Response) -> bytes:
    return b"".join(base64.b64decode(item["embedding"]) for item in response.json()["data"])


IMAGE = Request("/v1/images/generations", {"prompt": "a tiny red fox", "size": "64x64", "seed": 7}, first_image)
AUDIO = Request("/v1/audio/speech", {"input": "calm piano", "voice": "alloy", "duration": 0.5, "seed": 3},
                lambda response: response.content)  # a WAV: every sample
def scores(response: httpx.Response) -> bytes:
    return repr([(r["index"], r["relevance_score"]) for r in response.json()["results"]]).encode()


SCORES = Request("/v1/rerank", {"query": "where does the cat sit", "documents": ["the cat sits on the mat",
                                                                              "paris is the capital of france"]},
                 scores)
TRANSCRIPT = Request("/v1/audio/transcriptions", {"response_format": "verbose_json", "language": "en"},
                     lambda response: json.dumps(response.json()["segments"]).encode(), ("a.wav", tone(2.0)))
VECTORS = Request("/v1/embeddings", {"input": ["A man is eating food.", "The new movie is awesome."],
                                     "encoding_format": "base64"}, float32_bytes)


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from models.flux import tiny as builder

    model = builder.build(tmp_path_factory.mktemp("flux-tiny"))
    with followed("models/flux/server.py", "--model", str(model), "--default-steps", "2") as service:
        yield service


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # Built in a child process, as tests/models/test_musicgen.py does.
    model = tmp_path_factory.mktemp("musicgen-tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "models.musicgen.tiny", str(model)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    with followed("models/musicgen/server.py", "--model", str(model), "--cpu-threads", "1") as service:
        yield service


@pytest.fixture(scope="module")
def embeddings() -> Iterator[Service]:
    with followed("models/embeddings/server.py") as service:  # the packaged all-MiniLM-L6-v2
        yield service


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from models.whisper import tiny as builder

    model = builder.build(tmp_path_factory.mktemp("whisper-tiny"))
    with followed("models/whisper/server.py", "--model", str(model), "--max-new-tokens", "16") as service:
        yield service


@pytest.fixture(scope="module")
def rerank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from models.rerank import tiny as builder

    model = builder.build(tmp_path_factory.mktemp("rerank-tiny"))
    with followed("models/rerank/server.py", "--model", str(model)) as service:
        yield service


def ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


def state(url: str) -> dict[str, Any]:
    return dict(ok(httpx.get(url + "/state", timeout=10)).json())


def park_and_restore(service: Service, request: Request, level: int) -> None:
    url = service.url
    before = request.output(ok(request.send(url)))
    parked = ok(httpx.post(url + "/offload", params={"level": level}, timeout=120)).json()
    assert parked["state"] == "parked" and parked["level"] == level, parked
    assert state(url) == {key: value for key, value in parked.items() if key != "seconds"}
    assert parked["vram_bytes"] == 0
    # Level 1 keeps the weights in host memory; level 2 drops them (restore reads them from disk).
    assert parked["pinned_host_bytes"] > 0 if level == 1 else parked["pinned_host_bytes"] == 0
    refused = request.send(url)
    assert refused.status_code == 503 and "parked" in refused.text, refused.text
    restored = ok(httpx.post(url + "/restore", timeout=120)).json()
    assert restored["state"] == "ready" and restored["level"] is None, restored
    assert request.output(ok(request.send(url))) == before, service.log.tail()


@pytest.mark.parametrize("level", [1, 2])
def test_flux_parks_and_renders_the_same_image(flux: Service, level: int) -> None:
    park_and_restore(flux, IMAGE, level)


@pytest.mark.parametrize("level", [1, 2])
def test_musicgen_parks_and_generates_the_same_samples(musicgen: Service, level: int) -> None:
    park_and_restore(musicgen, AUDIO, level)


@pytest.mark.parametrize("level", [1, 2])
def test_embeddings_park_and_give_the_same_vectors(embeddings: Service, level: int) -> None:
    park_and_restore(embeddings, VECTORS, level)


@pytest.mark.parametrize("level", [1, 2])
def test_rerank_parks_and_gives_the_same_scores(rerank: Service, level: int) -> None:
    park_and_restore(rerank, SCORES, level)


@pytest.mark.parametrize("level", [1, 2])
def test_whisper_parks_and_gives_the_same_segments(whisper: Service, level: int) -> None:
    park_and_restore(whisper, TRANSCRIPT, level)


def test_a_second_park_copies_nothing(embeddings: Service) -> None:
    url, log = embeddings.url, embeddings.log
    ok(httpx.post(url + "/offload", params={"level": 1}, timeout=60))
    ok(httpx.post(url + "/restore", timeout=60))
    kept = state(url)["pinned_host_bytes"]
    assert kept > 0  # kept while serving, for the next park
    mark = log.mark()
    ok(httpx.post(url + "/offload", params={"level": 1}, timeout=60))
    log.wait_for(r"parked \d+ tensors .* at level 1", mark)  # logged after any copy, by the same thread
    assert not log.seen("host copy of", mark)
    assert state(url)["pinned_host_bytes"] == kept
    ok(httpx.post(url + "/restore", timeout=60))


# --- the text service's transformers engine, in this process --------------------------------------


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.mark.parametrize("level", [1, 2])
def test_transformers_engine_parks_and_decodes_the_same_tokens(tiny_text: Path, level: int) -> None:
    asyncio.run(_engine_round_trip(tiny_text, level))


async def _engine_round_trip(path: Path, level: int) -> None:
    import torch

    from core.runtime.openai_text import GenerationParams
    from models.vllm.engine_transformers import TransformersEngine

    engine = await asyncio.to_thread(TransformersEngine, str(path), "cpu", "float32", None)
    params = GenerationParams(max_tokens=16, temperature=0, top_p=1, n=1, stop=(), seed=None,
                              presence_penalty=0, frequency_penalty=0, ignore_eos=True)
    prompt = engine.chat_prompt_ids([{"role": "user", "content": "hello there"}])

    async def greedy() -> tuple[str, Any]:
        text = "".join([chunk.text async for chunk in engine.generate(prompt, params, "park-test")])
        with torch.no_grad():
            logits = engine.model(torch.tensor([prompt])).logits
        return text, logits

    try:
        text, logits = await greedy()
        await engine.offload(level)
        use = engine.memory_use()
        assert use.vram_bytes == 0 and use.host_bytes is not None and (use.host_bytes > 0) == (level == 1)
        assert all(p.numel() == 0 for p in engine.model.parameters())
        await engine.restore()
        again, logits_again = await greedy()
        assert again == text and text
        assert torch.equal(logits_again, logits)
    finally:
        await engine.close()

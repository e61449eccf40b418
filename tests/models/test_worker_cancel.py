"""Every model service: a generation whose client hung up has stopped before the next one starts.

Each service runs as a real process with its tiny local model. A long request goes out over
a bare socket; once the service logs that its job started, the socket is closed (the client
is gone) and a short request follows. core.runtime.worker logs every job from the worker thread
itself, so the service log's order is the order the jobs really ran in: the long job must
be logged as cancelled (it stopped early, at a step, a batch or a token) before the short
one is logged as started, and the short one must succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration import raw_http
from tests.integration.conftest import REPO
from tests.models.service_log import Service, followed
from tests.models.text_cases import text_service

pytestmark = pytest.mark.integration


def hang_up_during_job(service: Service, worker: str, path: str, long_body: dict[str, Any]) -> tuple[int, int]:
    """Send ``long_body``, close the connection once its job runs; (job id, log position after that)."""
    start = service.log.mark()
    port = urlsplit(service.url).port
    assert port is not None
    body = json.dumps(long_body).encode()
    with raw_http.connect(port) as sock:
        sock.sendall(raw_http.head("POST", path, {"Content-Type": "application/json"}, len(body)) + body)
        started = service.log.wait_for(rf"{worker}: job (\d+)(?: \([^)]*\))? started$", start)
    return int(started[1]), start


def assert_stopped_before_next(service: Service, worker: str, job: int, start: int) -> None:
    cancelled = service.log.position(rf"{worker}: job {job}\b.* cancelled after", start)
    following = service.log.position(rf"{worker}: job {job + 1}\b.* started$", start)
    assert cancelled < following, service.log.tail()
    # It stopped early: a job that ran to its end would be logged as finished, not cancelled.
    assert not service.log.seen(rf"{worker}: job {job}\b.* finished", start), service.log.tail()


# --- flux ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    pytest.importorskip("diffusers")
    from models.flux import tiny as builder

    model = builder.build(tmp_path_factory.mktemp("flux-tiny"))
    with followed("models/flux/server.py", "--model", str(model), "--default-steps", "1") as service:
        yield service


def test_flux_render_of_a_gone_client_stops_before_the_next(flux: Service) -> None:
    # 50 steps at 256x256 take 30-100 s on CPU; the interrupted render ends within a step.
    long_body = {"prompt": "a slow one", "size": "256x256", "num_inference_steps": 50, "seed": 5}
    job, start = hang_up_during_job(flux, "flux", "/v1/images/generations", long_body)
    short = httpx.post(flux.url + "/v1/images/generations", json={"prompt": "a fox", "size": "64x64"}, timeout=120)
    assert short.status_code == 200, short.text
    assert len(short.json()["data"]) == 1
    assert_stopped_before_next(flux, "flux", job, start)


# --- musicgen -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("musicgen-tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "models.musicgen.tiny", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    args = ("--model", str(out), "--max-duration", "30", "--cpu-threads", "1")
    with followed("models/musicgen/server.py", *args) as service:
        yield service


def test_musicgen_generation_of_a_gone_client_stops_before_the_next(musicgen: Service) -> None:
    # 30 s of audio takes seconds even for the tiny model; the cancelled one ends at its next step.
    long_body = {"input": "long song", "voice": "a", "duration": 30}
    job, start = hang_up_during_job(musicgen, "musicgen", "/v1/audio/speech", long_body)
    short = httpx.post(musicgen.url + "/v1/audio/speech", timeout=120,
                       json={"input": "calm piano", "voice": "a", "duration": 1.0, "seed": 1})
    assert short.status_code == 200, short.text
    assert short.headers["content-type"] == "audio/wav"
    assert_stopped_before_next(musicgen, "musicgen", job, start)


# --- embeddings ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embeddings() -> Iterator[Service]:
    pytest.importorskip("sentence_transformers")
    # Batches of 2: the 256 inputs below make 128 forward passes, and a cancelled job stops
    # before the next one.
    with followed("models/embeddings/server.py", "--device", "cpu", "--batch-size", "2") as service:
        yield service


def test_embedding_batch_of_a_gone_client_stops_before_the_next(embeddings: Service) -> None:
    # 256 inputs at the model's 256-token limit: tens of seconds on a shared CPU.
    long_body = {"input": ["a long sentence about nothing in particular, " * 40] * 256}
    job, start = hang_up_during_job(embeddings, "embeddings", "/v1/embeddings", long_body)
    short = httpx.post(embeddings.url + "/v1/embeddings", json={"input": "hi"}, timeout=60)
    assert short.status_code == 200, short.text
    assert len(short.json()["data"][0]["embedding"]) == 384
    assert_stopped_before_next(embeddings, "embeddings", job, start)


# --- the transformers text engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    pytest.importorskip("transformers")
    from models.vllm.tiny import build

    model = build(tmp_path_factory.mktemp("models") / "tiny-qwen")
    with text_service("--model", str(model), "--engine", "transformers") as running:
        yield Service(running.url, running.log)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole-answer"])
def test_text_generation_of_a_gone_client_stops_before_the_next(text: Service, stream: bool) -> None:
    # 900 tokens take ~15 s on 2 CPU cores; ignore_eos keeps the generation going that long.
    long_body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 900, "temperature": 0,
                 "ignore_eos": True, "stream": stream}
    job, start = hang_up_during_job(text, "transformers", "/v1/chat/completions", long_body)
    short = httpx.post(text.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
    assert short.status_code == 200, short.text
    assert short.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert_stopped_before_next(text, "transformers", job, start)

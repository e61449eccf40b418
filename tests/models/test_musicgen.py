"""The musicgen service as a real process with a tiny random-weight MusicGen, over HTTP.

A client that hangs up mid-generation: tests/models/test_worker_cancel.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import REPO, health_status, running_service
from tests.models.hf_cache import hub_snapshot
from tests.models.service_log import Service, followed

pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

SCRIPT = "models/musicgen/server.py"
RATE = 32_000
# One CPU thread: the tiny model is several times faster that way on a shared CPU.
ARGS = ("--default-duration", "1.0", "--max-duration", "30", "--cpu-threads", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built in a child process: keeps torch (and its warnings) out of the test process.
    out = tmp_path_factory.mktemp("musicgen-tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "models.musicgen.tiny", str(out)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    return out


@pytest.fixture(scope="module")
def service(tiny: Path) -> Iterator[Service]:
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:  # only while it starts: later services get no share
            patch.setenv("AIO_VRAM_GB", "6")  # as the orchestrator sets it from vram_gb; on CPU logged, unused
            service = stack.enter_context(followed(SCRIPT, "--model", str(tiny), *ARGS))
        yield service


@pytest.fixture(scope="module")
def url(service: Service) -> str:
    return service.url


def post(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/audio/speech", json=body, timeout=120)


def speech(url: str, **body: Any) -> httpx.Response:
    response = post(url, **{"model": "musicgen", "voice": "alloy", "input": "calm piano", **body})
    assert response.status_code == 200, response.text
    return response


def wav_info(data: bytes) -> tuple[int, int, int, float]:
    """(channels, sample width, rate, seconds) of a WAV file."""
    with wave.open(io.BytesIO(data)) as audio:
        rate = audio.getframerate()
        return audio.getnchannels(), audio.getsampwidth(), rate, audio.getnframes() / rate


def assert_error(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return str(error["message"])


@pytest.mark.parametrize("seconds", [1.0, 2.0])
def test_wav_lasts_the_requested_duration(url: str, seconds: float) -> None:
    response = speech(url, duration=seconds, seed=1, response_format="wav")
    assert response.headers["content-type"] == "audio/wav"
    channels, width, rate, duration = wav_info(response.content)
    assert (channels, width, rate) == (1, 2, RATE)
    assert abs(duration - seconds) <= 0.1


def test_default_format_and_duration(url: str) -> None:
    response = speech(url, seed=2)  # no response_format, no duration: WAV of --default-duration
    assert response.headers["content-type"] == "audio/wav"
    assert abs(wav_info(response.content)[3] - 1.0) <= 0.1


def test_seed_makes_output_deterministic(url: str) -> None:
    first = speech(url, duration=1.0, seed=7).content
    again = speech(url, duration=1.0, seed=7).content
    other = speech(url, duration=1.0, seed=8).content
    assert first == again
    assert first != other


def test_unseeded_request_reports_a_seed_that_reproduces_it(url: str) -> None:
    response = speech(url, duration=1.0)
    seed = int(response.headers["x-seed"])
    assert speech(url, duration=1.0, seed=seed).content == response.content


def test_pcm_is_raw_16_bit_samples(url: str) -> None:
    response = speech(url, duration=1.0, seed=1, response_format="pcm")
    assert response.headers["content-type"] == "audio/pcm"
    assert response.headers["x-sample-rate"] == str(RATE)
    assert abs(len(response.content) - 2 * RATE * 1.0) <= 2 * RATE * 0.1
    assert len(response.content) % 2 == 0
    # The same samples as the WAV of the same seed, without the header.
    wav = speech(url, duration=1.0, seed=1, response_format="wav").content
    assert wav.endswith(response.content) and len(wav) - len(response.content) == 44


def test_flac_only_with_soundfile(url: str) -> None:
    response = post(url, input="calm piano", voice="alloy", duration=1.0, response_format="flac")
    try:
        import soundfile  # noqa: F401
    except ImportError:
        assert "wav" in assert_error(response, "response_format")
    else:
        assert response.status_code == 200
        assert response.content.startswith(b"fLaC")


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": "   "}, "input"),
    ({"voice": "alloy"}, "input"),
    ({"input": "x" * 5000}, "input"),
    ({"input": "calm piano", "duration": 0}, "duration"),
    ({"input": "calm piano", "duration": -1}, "duration"),
    ({"input": "calm piano", "duration": 30.5}, "duration"),
    ({"input": "calm piano", "response_format": "mp3"}, "response_format"),
    ({"input": "calm piano", "response_format": "opus"}, "response_format"),
    ({"input": "calm piano", "speed": 10}, "speed"),
    ({"input": "calm piano", "seed": -1}, "seed"),
])
def test_bad_requests_get_an_openai_400(url: str, body: dict[str, Any], param: str) -> None:
    message = assert_error(post(url, **body), param)
    if param == "response_format":
        assert "wav" in message and "pcm" in message


def test_still_healthy_after_errors(url: str) -> None:
    assert_error(post(url, input=""), "input")
    assert health_status(url) == 200
    assert wav_info(speech(url, duration=1.0, seed=3).content)[2] == RATE


def test_extra_fields_are_ignored(url: str) -> None:
    plain = speech(url, duration=1.0, seed=4).content
    extra = speech(url, duration=1.0, seed=4, voice="nova", speed=2.0, instructions="cheerful", user="u1",
                   stream_format="audio", model="anything").content
    assert plain == extra


def test_health_answers_during_generation_and_requests_queue(service: Service) -> None:
    results: list[int] = []
    start = service.log.mark()

    def generate() -> None:
        # 10 s: long enough (about a second even for the tiny model) to still be running at the probe.
        results.append(post(service.url, input="slow jazz", voice="alloy", duration=10.0, seed=5).status_code)

    workers = [threading.Thread(target=generate) for _ in range(2)]
    for worker in workers:
        worker.start()
    first = int(service.log.wait_for(r"musicgen: job (\d+) \(speech\) started$", start)[1])
    began = time.monotonic()
    assert health_status(service.url) == 200
    assert time.monotonic() - began < 1.0
    assert any(worker.is_alive() for worker in workers)  # the probe really ran during a generation
    for worker in workers:
        worker.join(120)
    assert results == [200, 200]
    # Queued, not side by side: the second generation started once the first had finished.
    finished = service.log.position(rf"musicgen: job {first} \(speech\) finished in", start)
    assert service.log.position(rf"musicgen: job {first + 1} \(speech\) started$", start) > finished


def test_official_openai_client(url: str) -> None:
    # Closed explicitly: a pooled connection left to the garbage collector is a ResourceWarning (an error here).
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        audio = client.audio.speech.create(model="musicgen", voice="alloy", input="calm piano",
                                           response_format="wav", extra_body={"duration": 1.0, "seed": 1})
        data = audio.read()  # HttpxBinaryResponseContent: .read() / .content are the bytes
        with pytest.raises(openai.BadRequestError) as caught:
            client.audio.speech.create(model="musicgen", voice="alloy", input="calm piano", response_format="mp3")
    channels, _, rate, duration = wav_info(data)
    assert (channels, rate) == (1, RATE)
    assert abs(duration - 1.0) <= 0.1
    assert caught.value.status_code == 400
    assert caught.value.param == "response_format"


def test_share_is_logged_and_left_alone_on_cpu(service: Service) -> None:
    assert service.log.seen(r"GPU share 6 GiB not applied: the model runs on cpu$")


def test_hub_id_from_the_hf_cache_offline(url: str, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    # The GPU profile passes the hub id with HF_HUB_OFFLINE=1, and the playbook downloads transformers'
    # pytorch_model.bin (with the *.json files): the same layout here, weights converted from the tiny model.
    hf_home = tmp_path / "hf"
    snapshot = hub_snapshot(hf_home, "facebook/musicgen-medium")
    for path in tiny.glob("*.json"):
        shutil.copy(path, snapshot)
    convert = "import sys, torch, safetensors.torch as st; torch.save(st.load_file(sys.argv[1]), sys.argv[2])"
    weights = [str(tiny / "model.safetensors"), str(snapshot / "pytorch_model.bin")]
    subprocess.run([sys.executable, "-c", convert, *weights], check=True, capture_output=True, timeout=120)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    with running_service(SCRIPT, "--model", "facebook/musicgen-medium", *ARGS) as (_, hub_url):
        assert httpx.get(hub_url + "/health", timeout=10).json()["model"] == "facebook/musicgen-medium"
        from_hub = speech(hub_url, duration=1.0, seed=5).content
    assert wav_info(from_hub)[2] == RATE
    assert from_hub == speech(url, duration=1.0, seed=5).content  # the same weights as the local folder


def test_importing_the_server_does_not_import_torch() -> None:
    code = ("import sys, models.musicgen.server, models.musicgen.tiny; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=60)


@pytest.mark.gpu
def test_tiny_model_on_cuda(tiny: Path) -> None:
    with running_service(SCRIPT, "--model", str(tiny), "--device", "cuda", *ARGS) as (_, base):
        response = speech(base, duration=1.0, seed=1)
        channels, width, rate, duration = wav_info(response.content)
        assert (channels, width, rate) == (1, 2, RATE)
        assert abs(duration - 1.0) <= 0.1
        assert speech(base, duration=1.0, seed=1).content == response.content

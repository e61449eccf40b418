"""The whisper service as a real process with a tiny random-weight Whisper (built locally with
whisper-large-v3-turbo's geometry), through the official openai client and raw forms. Its words are
noise, so the tests assert shapes, times and that each format parses; the audio is made here."""

from __future__ import annotations

import io
import math
import re
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import running_service

pytest.importorskip("transformers")

pytestmark = pytest.mark.integration


def tone(seconds: float, rate: int = 22_050) -> bytes:
    """A WAV of a warbling tone (16-bit mono at ``rate``: resampled to 16 kHz by the service)."""
    frames = bytearray()
    for i in range(int(seconds * rate)):
        t = i / rate
        frames += int(9000 * math.sin(2 * math.pi * 220 * t) * math.sin(2 * math.pi * 3 * t)).to_bytes(
            2, "little", signed=True)
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(frames))
    return out.getvalue()


SHORT = tone(3.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.whisper import tiny

    return tiny.build(tmp_path_factory.mktemp("whisper-tiny"))


@pytest.fixture(scope="module")
def url(model: Path) -> Iterator[str]:
    with running_service("models/whisper/server.py", "--model", str(model), "--max-new-tokens", "24") as (_, base):
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def transcribe(url: str, audio: bytes = SHORT, path: str = "/v1/audio/transcriptions", **fields: Any
               ) -> httpx.Response:
    return httpx.post(url + path, files={"file": ("speech.wav", audio)}, data=fields, timeout=120)


def test_json_and_text(client: openai.OpenAI, url: str) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", SHORT))
    assert isinstance(result.text, str)
    text = transcribe(url, response_format="text")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert text.text.strip() == result.text


def test_verbose_json_segments_and_words_within_the_audio(client: openai.OpenAI) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", SHORT), language="fr",
                                                response_format="verbose_json",
                                                timestamp_granularities=["segment", "word"])
    assert result.language == "french" and result.duration == pytest.approx(3.0, abs=0.01)
    assert result.segments and result.words is not None
    for number, segment in enumerate(result.segments):
        assert segment.id == number and 0 <= segment.start <= segment.end <= 3.0
        assert segment.tokens and segment.avg_logprob < 0 and segment.temperature == 0.0
    assert "".join(s.text for s in result.segments).strip() == result.text
    assert all(0 <= w.start <= w.end <= 3.0 for w in result.words)


CUE = re.compile(r"(\d+)\n(\d\d:\d\d:\d\d[,.]\d{3}) --> (\d\d:\d\d:\d\d[,.]\d{3})\n")


def test_srt_and_vtt_parse(url: str) -> None:
    srt = transcribe(url, response_format="srt")
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("application/x-subrip")
    cues = CUE.findall(srt.text)
    assert [int(number) for number, _, _ in cues] == list(range(1, len(cues) + 1))
    assert all(start <= end for _, start, end in cues) and ("\n\n".join(srt.text.split("\n\n")) == srt.text)
    vtt = transcribe(url, response_format="vtt")
    assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT\n\n")
    times = re.findall(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})", vtt.text)
    assert len(times) == len(cues)


def test_long_audio_is_decoded_window_by_window(url: str) -> None:
    answer = transcribe(url, tone(45.0, 16_000), response_format="verbose_json")
    assert answer.status_code == 200, answer.text
    verbose = answer.json()
    assert verbose["duration"] == pytest.approx(45.0, abs=0.01)
    assert all(s["end"] <= 45.0 for s in verbose["segments"]) and verbose["usage"]["seconds"] == 45


def test_translation_and_a_prompt(url: str) -> None:
    answer = transcribe(url, path="/v1/audio/translations", response_format="verbose_json", prompt="A talk.")
    assert answer.status_code == 200 and answer.json()["task"] == "translate", answer.text


@pytest.mark.parametrize("suffix", [".flac", ".ogg"])
def test_other_containers_decode(url: str, tmp_path: Path, suffix: str) -> None:
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(SHORT), dtype="float32")
    path = tmp_path / f"speech{suffix}"
    soundfile.write(path, samples, rate)
    answer = httpx.post(url + "/v1/audio/transcriptions", files={"file": (path.name, path.read_bytes())},
                        data={"response_format": "verbose_json"}, timeout=120)
    assert answer.status_code == 200 and answer.json()["duration"] == pytest.approx(3.0, abs=0.05), answer.text


@pytest.mark.parametrize(("fields", "audio", "param"), [
    ({"response_format": "docx"}, SHORT, "response_format"),
    ({"temperature": "2"}, SHORT, "temperature"),
    ({"temperature": "warm"}, SHORT, "temperature"),
    ({"language": "klingon"}, SHORT, "language"),
    ({"timestamp_granularities[]": "word"}, SHORT, "timestamp_granularities[]"),
    ({"response_format": "verbose_json", "timestamp_granularities[]": "sentence"}, SHORT,
     "timestamp_granularities[]"),
    ({"stream": "true"}, SHORT, "stream"),
    ({}, b"not audio at all", "file"),
    ({}, b"", "file"),
])
def test_bad_requests_name_the_field(url: str, fields: dict[str, str], audio: bytes, param: str) -> None:
    answer = transcribe(url, audio, **fields)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", error
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_a_form_without_a_file_or_not_a_form(url: str) -> None:
    missing = httpx.post(url + "/v1/audio/transcriptions", data={"model": "whisper-1"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    as_json = httpx.post(url + "/v1/audio/transcriptions", json={"file": "speech.wav"}, timeout=30)
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]

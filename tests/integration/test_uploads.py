"""Uploads through a real orchestrator: a transcription's multipart form is routed by its ``model`` field
(wherever it stands, an alias, or the endpoint's default) and reaches the service byte for byte; a bad
form or a model of another type is refused before anything starts."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import fake_model

pytestmark = pytest.mark.integration

AUDIO = ("speech.wav", b"RIFF\x24\x00\x00\x00WAVE" + bytes(range(256)) * 512)  # 128 KiB of "audio"


def form(fields: dict[str, str], file_first: bool = False) -> tuple[bytes, str]:
    """(body, Content-Type) as the openai client's encoder (httpx) writes them; optionally the file first."""
    request = httpx.Request("POST", "http://x/", data=fields, files={"file": AUDIO})
    body, content_type = request.read(), request.headers["content-type"]
    if file_first:
        delimiter = b"--" + content_type.split("boundary=")[1].encode()
        parts = body.split(delimiter)[1:-1]
        body = delimiter + delimiter.join(parts[-1:] + parts[:-1]) + delimiter + b"--\r\n"
    return body, content_type


@pytest.fixture
def orch(orchestrator: Any) -> Any:
    models = {"whisper": fake_model("whisper", type="transcription", aliases=["whisper-1"], vram_gb=2),
              "chat": fake_model("chat", vram_gb=2)}
    return orchestrator(models, gpu_memory_gb=10, limits={"upload_body_mb": 1})


def post(orch: Any, body: bytes, content_type: str, path: str = "/v1/audio/transcriptions") -> httpx.Response:
    return httpx.post(orch.url + path, content=body, headers={"content-type": content_type}, timeout=60)


@pytest.mark.parametrize(("fields", "file_first"), [
    ({"model": "whisper", "response_format": "srt"}, False),
    ({"response_format": "json", "model": "whisper-1"}, True),  # an alias, after the file
    ({"language": "en"}, False),  # no model: the endpoint's default, the one transcription model
])
def test_a_form_reaches_its_model_unchanged(orch: Any, fields: dict[str, str], file_first: bool) -> None:
    body, content_type = form(fields, file_first)
    answer = post(orch, body, content_type)
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    assert (seen["service"], seen["path"]) == ("whisper", "/v1/audio/transcriptions")
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["content_type"] == content_type
    assert orch.status()["chat"]["state"] == "stopped"


def test_the_openai_client_uploads_and_translations_route_alike(orch: Any) -> None:
    client = openai.OpenAI(base_url=orch.url + "/v1", api_key="unused", max_retries=0)
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=AUDIO, language="en")
    assert raw.http_response.json()["path"] == "/v1/audio/transcriptions"
    body, content_type = form({"model": "whisper"}, file_first=True)
    assert post(orch, body, content_type, "/v1/audio/translations").json()["path"] == "/v1/audio/translations"


@pytest.mark.parametrize(("body", "content_type", "status", "code", "says"), [
    (b"--b\r\nno headers\r\n--b--", "multipart/form-data; boundary=b", 400, "invalid_multipart",
     "no blank line after its headers"),
    (b"--b\r\n", "multipart/form-data", 400, "invalid_multipart", "has no boundary"),
    (*form({"model": "chat"}), 404, "route_not_served",
     "The model 'chat' is a text model and does not serve /v1/audio/transcriptions"),
    (*form({"model": "nobody"}), 404, "model_not_found", "'nobody' does not exist"),
], ids=["no blank line", "no boundary", "a text model", "no such model"])  # ids: the boundaries are random
def test_a_bad_form_or_another_models_type_starts_nothing(orch: Any, body: bytes, content_type: str, status: int,
                                                          code: str, says: str) -> None:
    answer = post(orch, body, content_type)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and says in error["message"], error
    assert {name: model["state"] for name, model in orch.status().items()} == {"whisper": "stopped",
                                                                                "chat": "stopped"}


def test_an_upload_over_upload_body_mb_is_413(orch: Any) -> None:
    request = httpx.Request("POST", "http://x/", data={"model": "whisper"},
                            files={"file": ("big.wav", b"\0" * (1024 * 1024 + 1))})
    answer = post(orch, request.read(), request.headers["content-type"])
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large", answer.text
    assert orch.status()["whisper"]["state"] == "stopped"

"""whisper: speech to text, OpenAI's ``/v1/audio/transcriptions`` and ``/v1/audio/translations``.

Any Whisper checkpoint through transformers' ``WhisperForConditionalGeneration``; the GPU profile
serves openai/whisper-large-v3-turbo, the demo and CI a tiny random-weight Whisper of the same
geometry (``python -m models.whisper.tiny``). The request is a multipart form: ``file`` (WAV, FLAC,
OGG, MP3; M4A, MP4 and WebM with ffmpeg), ``model``, ``language``, ``prompt``, ``response_format``
(json, text, srt, vtt, verbose_json), ``temperature`` and ``timestamp_granularities[]`` (segment,
word). Long audio is decoded window by window (generate's long-form decoding). torch and
transformers are imported in ``load()``.

    python models/whisper/server.py --port 8006 --model PATH_OR_HUB_ID [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile

from core.common.errors import bad_request
from core.runtime.single_model import SingleModelService
from core.runtime.worker import JobContext
from models.whisper import audio, decoding
from models.whisper.formats import FORMATS, MEDIA_TYPES, Transcript, body

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

log = logging.getLogger(__name__)

HUB_MODEL = "openai/whisper-large-v3-turbo"
GRANULARITIES = ("segment", "word")



class WhisperService(SingleModelService):
    name = "whisper"
    engine_modules = ("torch", "transformers")
    default_port = 8006
    model: WhisperForConditionalGeneration

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)  # --device
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                            help="weights' type (auto: float16 on a GPU, float32 on the CPU)")
        parser.add_argument("--max-audio-seconds", type=float, default=3600.0, help="longest upload accepted")
        parser.add_argument("--max-new-tokens", type=int, default=440,
                            help="tokens decoded per 30 s window at most (Whisper's decoder holds 448)")

    async def load(self) -> None:
        started = time.monotonic()
        self.model_path = self.model_path or HUB_MODEL
        self.processor = await asyncio.to_thread(self._processor)
        self.model = await self.worker.run(self.load_model, label="load")
        log.info("%s: loaded %s on %s (%s) in %.1fs", self.name, self.model_path, self.model.device,
                 self.model.dtype, time.monotonic() - started)

    def _processor(self) -> Any:
        from transformers import WhisperProcessor

        return WhisperProcessor.from_pretrained(str(self.model_path))

    def build(self, device: str) -> WhisperForConditionalGeneration:
        import torch
        from transformers import WhisperForConditionalGeneration

        dtype = self.options.dtype if self.options.dtype != "auto" else "float16" if device == "cuda" else "float32"
        model = WhisperForConditionalGeneration.from_pretrained(str(self.model_path), dtype=getattr(torch, dtype))
        return model.to(device).eval()

    async def warmup(self) -> None:
        import numpy as np

        silence: Any = np.zeros(audio.RATE, dtype=np.float32)
        request = decoding.Request("transcribe", "en", None, 0.0, False, 4)
        await self.worker.run(self.transcribe, silence, request, label="warm-up")

    def transcribe(self, ctx: JobContext, samples: Any, request: decoding.Request) -> Transcript:
        return decoding.transcribe(self.model, self.processor, samples, request, ctx.check)

    def add_routes(self, app: FastAPI) -> None:
        for task, route in (("transcribe", "/v1/audio/transcriptions"), ("translate", "/v1/audio/translations")):
            app.post(route)(self._endpoint(task))

    def _endpoint(self, task: str) -> Any:
        async def endpoint(request: Request) -> Response:
            form = await _read_form(request)
            upload, response_format, asked = _checked(form, task, self.options.max_new_tokens)
            data = await upload.read()
            try:
                samples = await asyncio.to_thread(audio.decode, data, self.options.max_audio_seconds)
            except audio.AudioProblem as exc:
                raise bad_request(f"'file': {exc}.", "file", "invalid_audio") from None
            transcript = await self.worker.run(self.transcribe, samples, asked, label=task)
            answer = body(transcript, response_format)
            if isinstance(answer, str):
                return Response(answer, media_type=MEDIA_TYPES[response_format])
            return Response(json.dumps(answer), media_type=MEDIA_TYPES[response_format])
        return endpoint


async def _read_form(request: Request) -> Any:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise bad_request("Send the audio as multipart/form-data, with the file in the 'file' field.", "file")
    try:
        return await request.form()
    except Exception as exc:  # starlette's MultiPartException, python-multipart's parse errors
        raise bad_request(f"Could not parse the multipart/form-data body: {exc}.", None, "invalid_multipart") \
            from None


def _checked(form: Any, task: str, max_new_tokens: int) -> tuple[UploadFile, str, decoding.Request]:
    """(the upload, the response format, what to decode) from the form's fields, or a 400 naming the field."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_request("'file' is required: the audio file, as a file part of the form.", "file")
    response_format = str(form.get("response_format") or "json")
    if response_format not in FORMATS:
        raise bad_request(f"'response_format' must be one of {', '.join(FORMATS)}, not {response_format!r}.",
                          "response_format")
    granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise bad_request(f"'timestamp_granularities[]' may be segment and word, not {unknown[0]!r}.",
                          "timestamp_granularities[]")
    if granularities and response_format != "verbose_json":
        raise bad_request("'timestamp_granularities[]' needs response_format verbose_json.",
                          "timestamp_granularities[]")
    if str(form.get("stream") or "false").lower() == "true":
        raise bad_request("'stream' is not supported: Whisper answers once the audio is transcribed.", "stream")
    return upload, response_format, decoding.Request(
        task, _language(form.get("language")), str(form.get("prompt") or "") or None,
        _temperature(form.get("temperature")), "word" in granularities, max_new_tokens)


def _language(value: Any) -> str | None:
    from models.whisper.languages import code_of

    if not value:
        return None
    code = code_of(str(value))
    if code is None:
        raise bad_request(f"'language' {value!r} is not one Whisper knows: give an ISO-639-1 code such as en or "
                          "fr.", "language")
    return code


def _temperature(value: Any) -> float:
    try:
        temperature = float(value) if value not in (None, "") else 0.0
    except ValueError:
        raise bad_request("'temperature' must be a number from 0 to 1.", "temperature") from None
    if not 0 <= temperature <= 1:
        raise bad_request("'temperature' must be a number from 0 to 1.", "temperature")
    return temperature


__all__ = ["WhisperService"]

if __name__ == "__main__":
    WhisperService().run()

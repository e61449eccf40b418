"""musicgen: text-to-music with Meta's MusicGen, behind OpenAI's speech endpoint.

``POST /v1/audio/speech`` takes the music prompt as ``input`` and answers with audio
(WAV by default), so ``openai.OpenAI().audio.speech.create(...)`` works unchanged.
``voice`` is required by the OpenAI client but means nothing to MusicGen: any string
is accepted and ignored. Extensions: ``duration`` (seconds) and ``seed``.

    python models/musicgen/server.py --port 8003 [--model facebook/musicgen-medium]

The model runs on transformers' ``MusicgenForConditionalGeneration`` (audiocraft
cannot be installed next to current torch; see README.md). Everything the service
needs from it sits behind ``TransformersEngine.generate_audio``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import math
import secrets
import time
import wave
from typing import Any

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

from core.base_service import BaseService
from core.common.errors import bad_request
from core.host.memory_share import cap_torch_memory, release_cached_memory
from core.runtime.devices import resolve_device
from core.runtime.host_copy import HostCopy, ParksWithHostCopy
from core.runtime.torch_helpers import dtype_name, torch_dtype
from core.runtime.worker import JobContext, Worker

log = logging.getLogger(__name__)

MAX_INPUT_CHARS = 4096  # OpenAI's own limit for this endpoint
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}
MUSICGEN_CUDA_DTYPE = "float16"  # what --dtype auto means on CUDA here: the dtype this service was tested in


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (instructions, ...)
    model: str | None = None
    input: str
    voice: Any = None  # required by the OpenAI client; meaningless for music, so ignored
    response_format: str = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)  # OpenAI's range; accepted and ignored
    duration: float | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


def _abort_when(ctx: JobContext | None) -> Any:
    """A stopping criterion that aborts generate() (``JobCancelled``) once the job is cancelled.

    Raising (rather than stopping) also skips decoding the partial audio. A streamer
    would be the lighter hook, but MusicGen's generate() in transformers 5 hands the
    streamer only the prompt, never the decoding steps.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AbortWhenCancelled(StoppingCriteria):  # type: ignore[misc]  # transformers is untyped here
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if ctx is not None:
                ctx.check()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([AbortWhenCancelled()])


class TransformersEngine:
    """MusicGen through transformers. The service talks to it only via ``generate_audio``,
    so another engine (audiocraft, in its own environment) could replace it."""

    def __init__(self, path: str, device: str, dtype: str, guidance_scale: float) -> None:
        import torch
        from transformers import AutoProcessor

        self.torch = torch
        self.device = device
        self.guidance_scale = guidance_scale
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = _load_model(path, device, dtype)
        # Parking (core/runtime/parking.py); level 2 reloads the weights as they were loaded here.
        self.weights = HostCopy([self.model], device, loader=lambda: [_load_model(path, device, dtype)])
        audio = self.model.config.audio_encoder
        self.sampling_rate = int(audio.sampling_rate)
        hop = math.prod(audio.upsampling_ratios)
        self.frame_rate = int(getattr(audio, "frame_rate", None) or math.ceil(self.sampling_rate / hop))
        self.num_codebooks = int(self.model.decoder.config.num_codebooks)
        # The decoder's position table bounds how long one generation can be.
        positions = int(self.model.decoder.config.max_position_embeddings)
        self.max_duration = (positions - self.num_codebooks) / self.frame_rate

    def tokens_for(self, duration: float) -> int:
        # The delay pattern staggers the codebooks by one step each, so the first
        # (num_codebooks - 1) steps produce no complete frame.
        return max(1, round(duration * self.frame_rate)) + self.num_codebooks - 1

    def generate_audio(self, prompt: str, duration: float, seed: int, ctx: JobContext | None = None
                       ) -> tuple[Any, int]:
        """Mono float32 samples in [-1, 1] (a numpy array) and their sampling rate.

        With ``ctx`` (run as a worker job), a cancelled job stops at its next decoding step.
        """
        torch = self.torch
        inputs = self.processor(text=[prompt], padding=True, return_tensors="pt").to(self.device)
        torch.manual_seed(seed)  # seeds CPU and every CUDA device: same seed, same audio
        with torch.inference_mode():
            audio = self.model.generate(
                **inputs, max_new_tokens=self.tokens_for(duration), do_sample=True,
                guidance_scale=self.guidance_scale, stopping_criteria=_abort_when(ctx))
        samples = audio[0].float().mean(dim=0).cpu().numpy()  # (channels, n) → mono
        return samples[: round(duration * self.sampling_rate)], self.sampling_rate

    def close(self) -> None:
        self.weights.close()
        del self.model, self.processor, self.weights
        release_cached_memory()


def _load_model(path: str, device: str, dtype: str) -> Any:
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(
        path, dtype=torch_dtype(dtype, device, cuda_default=MUSICGEN_CUDA_DTYPE))
    return model.to(device).eval()


def to_pcm16(samples: Any) -> bytes:
    """Float samples → 16-bit signed little-endian PCM."""
    import numpy as np

    clipped = np.clip(samples, -1.0, 1.0)
    return bytes((clipped * 32767.0).round().astype("<i2").tobytes())


def encode(samples: Any, rate: int, fmt: str) -> bytes:
    if fmt == "pcm":
        return to_pcm16(samples)
    buffer = io.BytesIO()
    if fmt == "flac":
        import soundfile

        soundfile.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(to_pcm16(samples))
    return buffer.getvalue()


def supported_formats() -> list[str]:
    # FLAC needs libsndfile through the optional soundfile package; offer it only if present.
    flac = importlib.util.find_spec("soundfile") is not None
    return ["wav", "pcm", *(["flac"] if flac else [])]


def pick_device(choice: str, cpu_threads: int | None) -> str:
    import torch

    if cpu_threads:
        # Process-wide; a tiny model on a shared CPU runs several times faster on one thread.
        torch.set_num_threads(cpu_threads)
    return resolve_device(choice)


class MusicGenService(ParksWithHostCopy, BaseService):
    name = "musicgen"
    engine_modules = ("torch", "transformers")
    default_port = 8003

    def __init__(self) -> None:
        super().__init__()
        self.model_path = "facebook/musicgen-medium"
        self.engine: TransformersEngine | None = None
        # One generation at a time; a cancelled one ends before the next starts. After each, the
        # generation's cached GPU blocks go back, so that what NVML shows free really is.
        self.worker = Worker("musicgen", after_job=lambda: release_cached_memory(full_collection=False))
        self.formats: list[str] = []

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"],
                            help="auto: float16 on CUDA, float32 on CPU")
        parser.add_argument("--default-duration", type=float, default=5.0, help="seconds when a request gives none")
        parser.add_argument("--max-duration", type=float, default=30.0, help="longest audio a request may ask for")
        parser.add_argument("--guidance-scale", type=float, default=3.0,
                            help="classifier-free guidance; 1.0 turns it off (half the compute)")
        parser.add_argument("--cpu-threads", type=int, help="torch CPU threads (tiny models on a busy CPU: 1)")

    async def load(self) -> None:
        opts = self.options
        self.engine = await self.worker.run(self.load_engine, label="load")
        if opts.max_duration > self.engine.max_duration:
            log.warning("musicgen: --max-duration %.1f s exceeds what the model can generate; using %.1f s",
                        opts.max_duration, self.engine.max_duration)
            opts.max_duration = self.engine.max_duration
        opts.default_duration = min(opts.default_duration, opts.max_duration)
        self.formats = supported_formats()

    def load_engine(self, ctx: JobContext) -> TransformersEngine:
        """The engine, with torch held to this service's GPU share before any weights reach it.

        On the worker thread: importing torch and creating the CUDA context take seconds.
        """
        opts = self.options
        device = pick_device(opts.device, opts.cpu_threads)
        cap_torch_memory(self.vram_gb, device)
        dtype = dtype_name(opts.dtype, device, cuda_default=MUSICGEN_CUDA_DTYPE)
        log.info("musicgen: loading %s on %s (%s)", self.model_path, device, dtype)
        return TransformersEngine(str(self.model_path), device, dtype, opts.guidance_scale)

    async def warmup(self) -> None:
        # The first generate() pays for kernel selection and allocations; do it before ready.
        assert self.engine is not None
        began = time.monotonic()
        await self.generate(self.engine, "warm up", 0.1, 0, label="warm-up")
        log.info("musicgen: warm-up generation took %.2f s", time.monotonic() - began)

    async def unload(self) -> None:
        engine, self.engine = self.engine, None
        await self.worker.close()  # drops queued generations, stops the running one at its next step
        if engine is not None:
            engine.close()

    # -- parking (core/runtime/parking.py): the engine's weights, moved on the worker between generations --

    def parked_weights(self) -> HostCopy | None:
        return None if self.engine is None else self.engine.weights

    async def generate(self, engine: TransformersEngine, prompt: str, duration: float, seed: int, label: str
                       ) -> tuple[Any, int]:
        """One generation as a worker job; cancelling the caller stops it at its next decoding step."""
        def job(ctx: JobContext) -> tuple[Any, int]:
            return engine.generate_audio(prompt, duration, seed, ctx)

        return await self.worker.run(job, label=label)

    def validate(self, request: SpeechRequest) -> tuple[str, float, int]:
        """The prompt, duration and seed to generate with; 400 on bad values."""
        prompt = request.input.strip()
        if not prompt:
            raise bad_request("'input' must be a non-empty music prompt.", "input")
        if len(request.input) > MAX_INPUT_CHARS:
            raise bad_request(f"'input' is longer than {MAX_INPUT_CHARS} characters.", "input")
        if request.response_format not in self.formats:
            raise bad_request(f"Unsupported response_format '{request.response_format}'; "
                              f"supported: {', '.join(self.formats)}.", "response_format")
        limit = self.options.max_duration
        duration = self.options.default_duration if request.duration is None else request.duration
        if not (0 < duration <= limit):
            raise bad_request(f"'duration' must be more than 0 and at most {limit:g} seconds.", "duration")
        seed = secrets.randbits(63) if request.seed is None else request.seed
        return prompt, duration, seed

    async def speech(self, request: SpeechRequest) -> Response:
        prompt, duration, seed = self.validate(request)
        assert self.engine is not None
        began = time.monotonic()
        samples, rate = await self.generate(self.engine, prompt, duration, seed, label="speech")
        body = encode(samples, rate, request.response_format)
        log.info("musicgen: %.1f s of audio in %.2f s (seed %d)", duration, time.monotonic() - began, seed)
        headers = {"x-seed": str(seed), "x-sample-rate": str(rate)}
        return Response(content=body, media_type=MEDIA_TYPES[request.response_format], headers=headers)

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/audio/speech")
        async def speech(request: SpeechRequest) -> Response:
            return await self.speech(request)


__all__ = ["MusicGenService", "SpeechRequest", "TransformersEngine"]

if __name__ == "__main__":
    MusicGenService().run()

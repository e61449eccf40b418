"""flux: text-to-image with a diffusers FluxPipeline behind the OpenAI images API.

    python models/flux/server.py --port 8002 [--model black-forest-labs/FLUX.1-schnell]
    python -m models.flux.tiny .cache/tiny-models/image && python models/flux/server.py --model .cache/tiny-models/image

POST /v1/images/generations takes the OpenAI fields (prompt, n, size, response_format)
plus the extensions num_inference_steps, guidance_scale and seed, and answers with
base64 PNGs. One image batch renders at a time, in a worker thread, so /health stays
responsive while the GPU is busy. See README.md for options, limits and memory notes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from core.base_service import BaseService
from core.common.contract import TENSOR_PARALLEL_ENV
from core.common.errors import bad_request
from core.host.gpu_stack import release
from core.host.memory_share import cap_torch_memory, release_cached_memory
from core.runtime.devices import resolve_device
from core.runtime.host_copy import HostCopy, ParksWithHostCopy
from core.runtime.parking import ParkLevel
from core.runtime.torch_helpers import torch_dtype
from core.runtime.worker import JobContext, Worker

log = logging.getLogger("flux")  # not __name__: run as a script that is "__main__"

SIZE_STEP = 16  # Flux packs 2x2 latent patches and the VAE downsamples 8x: sides must divide by 16
MAX_STEPS = 50
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ImageRequest(BaseModel):
    # OpenAI clients send fields this service does not use (quality, style, user, ...).
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = "1024x1024"
    response_format: str | None = "b64_json"
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)


@dataclass
class Job:
    """One validated request, as the worker thread renders it."""

    prompt: str
    width: int
    height: int
    n: int
    steps: int
    guidance: float
    seed: int


def parse_size(size: str | None, max_size: int) -> tuple[int, int]:
    """'WxH' → (width, height); each side a positive multiple of 16, at most ``max_size``."""
    if size is None or size == "auto":
        size = "1024x1024"
    match = _SIZE.match(size)
    width, height = (int(match[1]), int(match[2])) if match else (0, 0)
    if not all(0 < side <= max_size and side % SIZE_STEP == 0 for side in (width, height)):
        raise bad_request(f"'size' must be 'WIDTHxHEIGHT' with each side a positive multiple of {SIZE_STEP} "
                          f"and at most {max_size} (got {size!r}).", "size")
    return width, height


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def weight_modules(pipe: Any) -> list[Any]:
    """The pipeline's components that hold weights (transformer, VAE, both text encoders), by name."""
    import torch

    components = pipe.components
    return [components[name] for name in sorted(components) if isinstance(components[name], torch.nn.Module)]


class FluxService(ParksWithHostCopy, BaseService):
    name = "flux"
    engine_modules = ("torch", "diffusers", "transformers")
    default_port = 8002

    def __init__(self) -> None:
        super().__init__()
        self.model_path = "black-forest-labs/FLUX.1-schnell"
        self.pipeline: Any = None
        self.weights: HostCopy | None = None  # what parking moves (core/runtime/parking.py); None with --offload
        self.spread = False  # components on several GPUs (--gpus, diffusers' device map): cannot park
        # One render at a time (the pipeline is not thread-safe); after each, the job's cached
        # GPU blocks go back so that what NVML shows free between requests really is free.
        self.worker = Worker("flux", after_job=lambda: release_cached_memory(full_collection=False))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                            help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
        parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
        parser.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                            help="CPU offload to fit smaller GPUs (CUDA only; ignored with a warning otherwise)")
        parser.add_argument("--gpus", type=int, default=int(os.environ.get(TENSOR_PARALLEL_ENV) or 1),
                            help="GPUs to spread the pipeline's components over (default: models.yaml's "
                            "tensor_parallel, $AIO_TENSOR_PARALLEL): 2 runs FLUX on two 24 GB cards")
        parser.add_argument("--default-steps", type=int, default=4, help="num_inference_steps when not sent")
        parser.add_argument("--default-guidance", type=float, default=0.0, help="guidance_scale when not sent")
        parser.add_argument("--max-size", type=int, default=1536, help="largest width or height in pixels")
        parser.add_argument("--max-images", type=int, default=4, help="largest n per request")
        parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 prompt tokens")

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> None:
        # Loading reads gigabytes and builds modules: off the loop, so /health answers 503 meanwhile.
        self.pipeline = await asyncio.to_thread(self._load_pipeline)

    def _load_pipeline(self) -> Any:
        """The pipeline on its device; without --offload, also ``self.weights`` to park it with."""
        device = resolve_device(self.options.device)
        dtype = torch_dtype(self.options.dtype, device)
        split = split_kwargs(self.options.gpus, device, self.vram_gb)
        self.spread = bool(split)
        for each in [f"cuda:{index}" for index in range(self.options.gpus)] if split else [device]:
            cap_torch_memory(self.vram_gb, each)  # before any weights reach a GPU
        log.info("loading %s (%s, %s, offload=%s%s)", self.model_path, device, dtype, self.options.offload,
                 f", over {self.options.gpus} GPUs" if split else "")
        began = time.monotonic()
        pipe = self._from_pretrained(dtype, **split)
        # Decode the images of a batch one at a time, and large images in overlapping tiles: 4 images
        # of 1536x1536 in one VAE pass would need tens of GB at the very end of a render. Tiling starts
        # above the VAE's sample_size (1024 px for FLUX.1), so smaller images are decoded whole.
        # diffusers 0.42 has these switches on the VAE only (the pipeline's enable_vae_* are gone).
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        offload = self.options.offload
        if offload != "none" and device != "cuda":
            # accelerate's offload hooks need an accelerator; on CPU there is nothing to offload to.
            log.warning("--offload %s needs CUDA; running without offload on %s", offload, device)
            offload = "none"
        if split and offload != "none":
            log.warning("--offload %s with --gpus %d: the GPUs hold it all; no offload", offload, self.options.gpus)
            offload = "none"
        if offload == "model":
            pipe.enable_model_cpu_offload()
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload()
        elif not split:  # spread, diffusers placed each component on its GPU and moves tensors between them
            pipe.to(device)
            # Level 2 reloads the weights the way they were loaded here, straight onto the device.
            self.weights = HostCopy(weight_modules(pipe), device,
                                    loader=lambda: weight_modules(self._from_pretrained(dtype).to(device)))
        pipe.set_progress_bar_config(disable=True)  # one tqdm bar per request would flood the log
        log.info("loaded in %.1fs", time.monotonic() - began)
        return pipe

    def _from_pretrained(self, dtype: Any, **split: Any) -> Any:
        import diffusers
        from diffusers import FluxPipeline

        # diffusers 0.40 renamed torch_dtype= to dtype=. 0.39 (the newest the torch 2.9.1 stack can
        # have) ignores dtype= with a warning and loads float32: twice the memory, silently.
        keyword = "dtype" if release(diffusers.__version__)[:2] >= (0, 40) else "torch_dtype"
        pipe = FluxPipeline.from_pretrained(self.model_path, **{keyword: dtype}, **split)
        if pipe.transformer.dtype != dtype:
            raise RuntimeError(f"diffusers {diffusers.__version__} loaded {pipe.transformer.dtype}, not {dtype}")
        return pipe

    async def warmup(self) -> None:
        # The first call pays for kernel selection and allocator growth; do it before reporting ready.
        job = Job("warm up", 64, 64, 1, 1, self.options.default_guidance, 0)
        began = time.monotonic()
        await self.render(job)
        log.info("warm-up generation took %.2fs", time.monotonic() - began)

    async def unload(self) -> None:
        await self.worker.close()  # drops queued renders, stops the running one at its next step
        if self.weights is not None:
            self.weights.close()  # the host copy, if parked once
            self.weights = None
        if self.pipeline is None:
            return
        self.pipeline = None
        release_cached_memory()

    # -- parking (core/runtime/parking.py) ------------------------------------------------------------

    def park_unsupported(self, level: ParkLevel | None = None) -> str | None:
        if self.spread:
            return (f"flux runs over {self.options.gpus} GPUs (diffusers' device map): its components cannot "
                    "be moved as one, so it cannot park (it is stopped instead)")
        if self.weights is None and self.options.offload != "none":
            return (f"flux runs with --offload {self.options.offload}: accelerate's hooks move its weights, "
                    "so it cannot park (it is stopped instead)")
        return None if self.weights is None or level is None else self.weights.unsupported(level)

    # -- generation -----------------------------------------------------------------------

    def job_for(self, request: ImageRequest) -> Job:
        """Validate what pydantic cannot (limits set on the command line) and build the job."""
        prompt = request.prompt.strip()
        if not prompt:
            raise bad_request("'prompt' must not be empty.", "prompt")
        if request.n > self.options.max_images:
            raise bad_request(f"'n' must be between 1 and {self.options.max_images}.", "n")
        if request.response_format not in (None, "b64_json"):
            detail = ("this service returns images inline only; use 'b64_json'" if request.response_format == "url"
                      else "the only supported value is 'b64_json'")
            raise bad_request(f"Unsupported 'response_format' {request.response_format!r}: {detail}.",
                              "response_format")
        width, height = parse_size(request.size, self.options.max_size)
        steps = request.num_inference_steps or self.options.default_steps
        guidance = self.options.default_guidance if request.guidance_scale is None else request.guidance_scale
        # Without a seed, draw one so that every image can be reproduced from the log.
        seed = random.randrange(2**63) if request.seed is None else request.seed
        return Job(prompt, width, height, request.n, steps, guidance, seed)

    async def render(self, job: Job) -> list[str]:
        """Render on the worker thread; a cancelled request stops the pipeline at its next step."""
        return await self.worker.run(self._render_pngs, job, label="render")

    def _render_pngs(self, ctx: JobContext, job: Job) -> list[str]:
        import torch

        def stop_if_cancelled(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if ctx.cancelled:
                pipe._interrupt = True  # FluxPipeline skips the remaining denoising steps
            return tensors

        began = time.monotonic()
        # A CPU generator gives the same latents for a seed whatever the device.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        result = self.pipeline(
            prompt=job.prompt, width=job.width, height=job.height, num_images_per_prompt=job.n,
            num_inference_steps=job.steps, guidance_scale=job.guidance, generator=generator,
            max_sequence_length=self.options.max_sequence_length, callback_on_step_end=stop_if_cancelled)
        ctx.check()  # interrupted: no images to encode
        images = [png_base64(image) for image in result.images]
        log.info("%d image(s) %dx%d, %d steps, seed %d in %.2fs",
                 job.n, job.width, job.height, job.steps, job.seed, time.monotonic() - began)
        return images

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/images/generations")
        async def generations(request: ImageRequest) -> dict[str, Any]:
            job = self.job_for(request)
            images = await self.render(job)
            return {"created": int(time.time()), "data": [{"b64_json": image} for image in images]}



def split_kwargs(gpus: int, device: str, share_gb: float | None) -> dict[str, Any]:
    """``from_pretrained``'s keywords that spread the pipeline's components over ``gpus`` GPUs, each held
    to the share: diffusers' pipeline device map "balanced" (the transformer on one GPU, the text
    encoders and the VAE on the next). {} for one GPU, or on CPU (with a warning: nothing to spread over)."""
    if gpus < 2:
        return {}
    if not device.startswith("cuda"):
        log.warning("--gpus %d needs CUDA; running on %s as one device", gpus, device)
        return {}
    split: dict[str, Any] = {"device_map": "balanced"}
    if share_gb:
        split["max_memory"] = {index: f"{share_gb:g}GiB" for index in range(gpus)}
    return split


__all__ = ["FluxService", "ImageRequest", "Job", "parse_size", "split_kwargs"]

if __name__ == "__main__":
    FluxService().run()

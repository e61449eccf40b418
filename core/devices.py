"""Which torch device a model service runs on. torch is imported only when called."""

from __future__ import annotations


def resolve_device(choice: str) -> str:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU fails at load, clearly."""
    import torch

    cuda = bool(torch.cuda.is_available())
    if choice == "auto":
        return "cuda" if cuda else "cpu"
    if choice == "cuda" and not cuda:
        raise RuntimeError("--device cuda was requested, but torch sees no CUDA device")
    return choice

"""Which torch device a model service runs on. torch is imported only when called.

``auto`` means CUDA when torch can use a GPU, and CPU only on a host without one. A GPU
host whose torch cannot reach the driver (a CPU-only wheel, a CUDA build newer than the
driver, hidden devices) is refused instead: falling back would load a GPU-sized model
into host RAM in float32 and report ready at a fraction of the speed. ``--device cpu``
stays available for running on the CPU on purpose.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The driver's view of the GPUs this process can see, without torch or NVML: one folder per
# GPU (named by PCI address) under /proc, and one /dev/nvidiaN node per GPU. Containers get
# both for the GPUs they were given.
NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")
_GPU_NODE = re.compile(r"nvidia\d+")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says what to install or pass instead."""


def host_nvidia_gpus(proc_gpus: Path = NVIDIA_PROC_GPUS, dev: Path = DEV) -> list[str]:
    """The NVIDIA GPUs the host shows this process (PCI addresses or device nodes); [] if none."""
    found = sorted(_entries(proc_gpus))
    if not found:
        found = sorted(str(dev / name) for name in _entries(dev) if _GPU_NODE.fullmatch(name))
    return found


def _entries(folder: Path) -> list[str]:
    try:
        return [entry.name for entry in folder.iterdir()]
    except OSError:  # absent (no driver) or unreadable: no GPU to see from here
        return []


def torch_build(version: str, cuda: str | None) -> str:
    """'torch 2.13.0+cpu (a CPU-only build)' or 'torch 2.14.0+cu130 (built for CUDA 13.0)'."""
    return f"torch {version} ({'built for CUDA ' + cuda if cuda else 'a CPU-only build'})"


def choose_device(choice: str, *, torch_cuda: bool, host_gpus: Sequence[str], build: str,
                  visible_devices: str | None = None) -> str:
    """The device for ``choice`` ('auto', 'cuda', 'cpu', ...) given what torch and the host see."""
    if choice == "cpu" or (choice != "auto" and not choice.startswith("cuda")):
        return choice
    if torch_cuda:
        return "cuda" if choice == "auto" else choice
    if choice == "auto" and not host_gpus:
        return "cpu"
    hidden = f"; CUDA_VISIBLE_DEVICES is {visible_devices!r}" if visible_devices is not None else ""
    if choice == "auto":
        raise DeviceError(
            f"--device auto: this host has an NVIDIA GPU ({', '.join(host_gpus)}), but {build} cannot use it"
            f"{hidden}. Install a torch build that matches the driver (nvidia-smi shows the newest CUDA it "
            "supports), or pass --device cpu to run on the CPU deliberately.")
    seen = f"the host shows {', '.join(host_gpus)}" if host_gpus else "the host shows no NVIDIA GPU"
    raise DeviceError(f"--device {choice} was requested, but torch sees no CUDA device ({build}; {seen}{hidden}). "
                      "Install a torch build that matches the driver, or pass --device cpu.")


def resolve_device(choice: str, *, host_gpus: Callable[[], list[str]] = host_nvidia_gpus) -> str:
    """``auto`` → cuda when torch sees a GPU, cpu on a host without one, else a clear error.

    ``cuda`` without a usable GPU fails the same way; ``cpu`` is always allowed.
    ``host_gpus`` finds the host's GPUs (injectable for tests).
    """
    import torch

    if choice == "cpu":
        return choice
    cuda = bool(torch.cuda.is_available())
    return choose_device(choice, torch_cuda=cuda, host_gpus=[] if cuda else host_gpus(),
                         build=_build_of(torch), visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


def _build_of(torch: Any) -> str:
    return torch_build(str(torch.__version__), torch.version.cuda)

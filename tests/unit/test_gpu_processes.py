"""Per-process GPU memory (NVML) and the park's "was the memory given back" check.

NVML needs an NVIDIA driver, which this machine lacks: a stand-in ``pynvml`` module answers the
same calls (nvmlInit, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
nvmlDeviceGetComputeRunningProcesses), so only the driver itself is left unproven.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from core.gpu import gpu_bytes_by_pid
from core.park_client import ParkFailed
from core.service_park import _check_freed, gpu_bytes_of_tree

GIB = 1024**3


def fake_nvml(devices: list[list[tuple[int, int | None]]], init_fails: bool = False) -> Any:
    def init() -> None:
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    return SimpleNamespace(
        nvmlInit=init, nvmlDeviceGetCount=lambda: len(devices), nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda i: [SimpleNamespace(pid=p, usedGpuMemory=m)
                                                        for p, m in devices[i]])


def test_usage_is_summed_per_process_over_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[(10, 2 * GIB), (11, None)], [(10, GIB), (12, 5)]]))
    assert gpu_bytes_by_pid() == {10: 3 * GIB, 12: 5}  # a process NVML cannot measure is left out


def test_without_nvml_nothing_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_fails=True))
    assert gpu_bytes_by_pid() is None
    assert gpu_bytes_of_tree(os.getpid()) is None


def test_a_service_counts_its_children_too() -> None:
    child = subprocess.Popen(["sleep", "30"])  # like vLLM's engine core below the service
    try:
        usage = {os.getpid(): GIB, child.pid: 4 * GIB, 1: 100 * GIB}
        assert gpu_bytes_of_tree(os.getpid(), usage) == 5 * GIB
        assert gpu_bytes_of_tree(None, usage) is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("before", "after", "freed"), [
    (20 * GIB, 1 * GIB, True),     # the CUDA context stays: fine
    (20 * GIB, 3 * GIB, True),     # vLLM keeps its CUDA graphs: under half, fine
    (20 * GIB, 15 * GIB, False),   # nothing much given back (expandable_segments, vllm #14189)
    (3 * GIB, 1.8 * GIB, True),    # a small model: what stays is within the 2 GiB allowance
    (None, 15 * GIB, True),        # no NVML: nothing to check against
])
def test_a_park_that_frees_too_little_counts_as_failed(before: int | None, after: float, freed: bool) -> None:
    if freed:
        _check_freed(before, int(after))
    else:
        with pytest.raises(ParkFailed, match=r"not given back: 15\.0 GiB still in use"):
            _check_freed(before, int(after))

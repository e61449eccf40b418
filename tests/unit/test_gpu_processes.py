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

from core.host.gpu import blind_view, gpu_bytes_by_pid
from core.supervision.park_client import ParkFailed
from core.supervision.service_park import Held, _check_freed, gpu_bytes_of_tree, gpu_held

GIB = 1024**3


def fake_nvml(devices: list[list[tuple[int, int | None]]], init_fails: bool = False,
              used: list[int] | None = None) -> Any:
    """A stand-in pynvml: per device, its processes (pid, bytes) and (``used``) the memory in use on it,
    by default what its processes hold."""
    def init() -> None:
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    in_use = used if used is not None else [sum(m or 0 for _, m in device) for device in devices]
    return SimpleNamespace(
        nvmlInit=init, nvmlDeviceGetCount=lambda: len(devices), nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda i: SimpleNamespace(total=80 * GIB, used=in_use[i], free=80 * GIB - in_use[i]),
        nvmlDeviceGetComputeRunningProcesses=lambda i: [SimpleNamespace(pid=p, usedGpuMemory=m)
                                                        for p, m in devices[i]],
        nvmlDeviceGetUUID=lambda i: f"GPU-{i}", nvmlDeviceGetName=lambda i: "NVIDIA H100",
        nvmlDeviceGetPciInfo=lambda i: SimpleNamespace(busId=f"00000000:{i + 1:02x}:00.0"))


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
    held = None if before is None else Held(before)
    if freed:
        _check_freed(held, Held(int(after)), 20)
    else:
        with pytest.raises(ParkFailed, match=r"not given back: 15\.0 GiB still in use"):
            _check_freed(held, Held(int(after)), 20)


# --- a blind per-process view (containers): #20 ------------------------------------------------------------

FOREIGN = 4_000_000  # a host PID that no process of this namespace has


def test_a_view_of_foreign_pids_only_is_blind_and_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML inside a container reporting the host's PIDs: nothing is charged to a visible process.
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[(FOREIGN, 20 * GIB)]]))
    assert gpu_bytes_by_pid() is None
    assert gpu_bytes_of_tree(os.getpid()) is None  # /status: unknown, not 0 GiB


def test_a_view_of_zeros_while_the_device_is_busy_is_blind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[(os.getpid(), 0)]], used=[20 * GIB]))
    assert gpu_bytes_by_pid() is None


def test_an_idle_gpu_or_a_visible_process_is_a_real_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[]], used=[300 * 1024**2]))  # the driver's own
    assert gpu_bytes_by_pid() == {}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[(FOREIGN, GIB), (os.getpid(), 5 * GIB)]]))
    assert gpu_bytes_by_pid() == {FOREIGN: GIB, os.getpid(): 5 * GIB}


def test_blind_view_rule() -> None:
    assert blind_view({FOREIGN: 10 * GIB}, 10 * GIB, lambda pid: pid != FOREIGN)
    assert not blind_view({FOREIGN: 10 * GIB, 7: GIB}, 11 * GIB, lambda pid: pid != FOREIGN)
    assert not blind_view({}, GIB // 2, lambda pid: True)  # under the driver's floor: an idle GPU


def test_with_a_blind_view_the_park_is_checked_on_the_devices_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[(FOREIGN, 30 * GIB)]]))
    before = gpu_held(os.getpid())
    assert before == Held(30 * GIB, device=True)
    _check_freed(before, Held(12 * GIB, device=True), 20)  # freed 18 of its 20 GB: parked
    with pytest.raises(ParkFailed, match=r"the devices freed 2\.0 GiB of its 20 GB"):
        _check_freed(before, Held(28 * GIB, device=True), 20)
    _check_freed(before, Held(28 * GIB, device=True), None)  # no declared share: nothing to compare with
    _check_freed(before, Held(28 * GIB), 20)  # the view changed between the two reads: no verdict


def test_the_process_overhead_is_a_cuda_context_where_nvml_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.host.gpu import GPU_PROCESS_OVERHEAD_GB, resolve_process_overhead

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([[]]))
    assert resolve_process_overhead("auto") == GPU_PROCESS_OVERHEAD_GB == 0.5
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_fails=True))
    assert resolve_process_overhead("auto") == 0.0  # CPU services hold no CUDA context
    assert resolve_process_overhead(1.25) == 1.25

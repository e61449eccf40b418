"""model-orchestrator/foreign_memory.py and core.host.gpu.processes_by_gpu: what processes not the
orchestrator's hold on each GPU, over the stand-in NVML (tests/fakes/nvml: a mock of the driver)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.host import gpu
from model_orchestrator.foreign_memory import RECENT_S, ForeignMemory, foreign_gb, own_pids, with_others
from model_orchestrator.placement import Device
from tests.fakes import stand_in_nvml

GIB = 1024**3


def two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    devices = [{"uuid": f"GPU-{i}bbb", "name": "NVIDIA GeForce RTX 4090", "total_gb": 24} for i in range(2)]
    (tmp_path / "nvml.json").write_text(json.dumps({"devices": devices, "used": str(tmp_path / "used.json")}))
    monkeypatch.setenv("AIO_FAKE_NVML", str(tmp_path / "nvml.json"))
    nvml = stand_in_nvml.load()
    monkeypatch.setattr(gpu, "_nvml", lambda: nvml)
    return nvml


def test_processes_per_gpu_and_what_others_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus(tmp_path, monkeypatch)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        nvml.claim(os.getpid(), {0: 6 * GIB})
        nvml.claim(other.pid, {0: 10 * GIB, 1: 2 * GIB})
        per_gpu = gpu.processes_by_gpu([0, 1])
        assert per_gpu == {0: {os.getpid(): 6 * GIB, other.pid: 10 * GIB}, 1: {other.pid: 2 * GIB}}
        assert gpu.gpu_bytes_by_pid() == {os.getpid(): 6 * GIB, other.pid: 12 * GIB}
        assert foreign_gb(per_gpu, {os.getpid()}) == {0: 10.0, 1: 2.0}
    finally:
        other.kill()
        other.wait()


def test_a_process_with_compute_and_graphics_contexts_counts_once() -> None:
    proc = SimpleNamespace(pid=7, usedGpuMemory=3 * GIB)
    nvml = SimpleNamespace(nvmlDeviceGetComputeRunningProcesses=lambda handle: [proc],
                           nvmlDeviceGetGraphicsRunningProcesses=lambda handle: [proc, SimpleNamespace(pid=8,
                                                                                 usedGpuMemory=None)])
    assert gpu._held_on(nvml, None) == {7: 3 * GIB}  # 8: NVML cannot measure it (absent, as before)


def test_a_blind_view_charges_nobody(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container shown the host's PIDs: none of the memory is charged to a process here."""
    nvml = two_gpus(tmp_path, monkeypatch)
    monkeypatch.setattr(gpu, "blind_view", lambda by_pid, used: True)
    nvml.claim(os.getpid(), {0: 6 * GIB})
    assert gpu.processes_by_gpu([0, 1]) is None
    watch = ForeignMemory([Device(0, 24.0, total_gb=24.0)], lambda devices: None, ours=set)
    assert watch.read() == {}


def test_a_pid_that_was_ours_stays_ours_for_a_while() -> None:
    """A stopped service's memory can show for a moment after it exits, charged to its old pid."""
    now = [0.0]
    ours = [{10, 11}]
    readings = {0: {11: 8 * GIB, 99: 4 * GIB}}
    applied: list[list[Device]] = []
    watch = ForeignMemory([Device(0, 24.0, total_gb=24.0), Device(1, 24.0, total_gb=24.0)], applied.append,
                          read=lambda indices: readings, ours=lambda: ours[0], clock=lambda: now[0])
    assert watch.read() == {0: 4.0}
    ours[0], now[0] = {10}, 5.0  # 11 has exited; NVML still lists it
    assert watch.read() == {0: 4.0}
    now[0] = 5.0 + RECENT_S + 1  # long gone: whoever holds that pid now is not ours
    assert watch.read() == {0: 12.0}
    watch.update({0: 4.0, 1: 0.1})
    watch.update({0: 4.04, 1: 0.0})  # the same to a tenth of a GB (and below the noise): nothing to re-place
    assert [[(d.index, d.others_gb) for d in devices] for devices in applied] == [[(0, 4.0), (1, 0.0)]]


def test_with_others_and_own_pids() -> None:
    devices = with_others([Device(0, 20.0, total_gb=24.0, reserve_gb=1.0), Device(1, 24.0)], {0: 9.0, 1: 0.1})
    assert [(d.others_gb, d.within_room().budget_gb) for d in devices] == [(9.0, 14.0), (0.0, 24.0)]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert {os.getpid(), child.pid} <= own_pids()
    finally:
        child.kill()
        child.wait()

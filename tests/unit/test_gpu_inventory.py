"""core/host/gpu_inventory.py over the stand-in NVML (tests/fakes/nvml/pynvml.py): the devices a
mask leaves, UUIDs, MIG refused, and the stand-in's ledger of used memory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from core.host.gpu_inventory import Gpu, InventoryError, read_inventory, visible
from tests.fakes import stand_in_nvml

GIB = 1024**3


def four_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> ModuleType:
    devices = [{"uuid": f"GPU-{i}aaa{i}-0000", "pci_bus_id": f"00000000:{i + 1:02x}:00.0",
                "name": "NVIDIA RTX A6000", "total_gb": 48, **extra.get(str(i), {})} for i in range(4)]
    (tmp_path / "nvml.json").write_text(json.dumps({"devices": devices, "used": str(tmp_path / "used.json")}))
    monkeypatch.setenv("AIO_FAKE_NVML", str(tmp_path / "nvml.json"))
    return stand_in_nvml.load()


def indices(devices: list[Gpu]) -> list[int]:
    return [d.index for d in devices]


def test_without_a_mask_every_gpu_in_pci_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = read_inventory(four_gpus(tmp_path, monkeypatch), {})
    assert indices(devices) == [0, 1, 2, 3]
    assert devices[2] == Gpu(2, "GPU-2aaa2-0000", "00000000:03:00.0", "NVIDIA RTX A6000", 48 * GIB)
    assert devices[2].total_gb == 48


@pytest.mark.parametrize(("mask", "expected"), [
    ("2,3", [2, 3]),  # the parent's own mask: children may get only these
    ("3,1", [3, 1]),  # the mask's order, as CUDA numbers them
    ("GPU-1aaa,GPU-0aaa0-0000", [1, 0]),  # UUIDs and unique UUID prefixes
    ("2, 2 ,3", [2, 3]),
    ("", []), ("-1", []), ("NoDevFiles", []),
])
def test_the_orchestrators_mask_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mask: str,
                                        expected: list[int]) -> None:
    assert indices(read_inventory(four_gpus(tmp_path, monkeypatch), {"CUDA_VISIBLE_DEVICES": mask})) == expected


def test_an_entry_naming_no_gpu_ends_the_list_as_in_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    nvml = four_gpus(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert indices(read_inventory(nvml, {"CUDA_VISIBLE_DEVICES": "1,7,2"})) == [1]
        assert indices(read_inventory(nvml, {"CUDA_VISIBLE_DEVICES": "GPU-"})) == []  # ambiguous prefix
    assert "'7' names no GPU" in caplog.text


def test_mixed_cards_under_a_numeric_mask_ask_for_pci_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    nvml = four_gpus(tmp_path, monkeypatch, **{"3": {"name": "NVIDIA GeForce RTX 4090", "total_gb": 24}})
    with caplog.at_level(logging.WARNING):
        read_inventory(nvml, {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        assert "CUDA_DEVICE_ORDER" not in caplog.text
        read_inventory(nvml, {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert "set CUDA_DEVICE_ORDER=PCI_BUS_ID or name the GPUs by UUID" in caplog.text


def test_mig_is_refused_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = four_gpus(tmp_path, monkeypatch, **{"1": {"mig": True}, "2": {"mig": False}})
    with pytest.raises(InventoryError, match=r"GPU 1 is in MIG mode.*nvidia-smi -i 1 -mig 0"):
        read_inventory(nvml, {})
    with pytest.raises(InventoryError, match="names a MIG slice"):
        visible([], "MIG-4b1c-aa/1/0")


def test_the_stand_in_counts_live_processes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = four_gpus(tmp_path, monkeypatch)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    nvml.claim(os.getpid(), {1: 10 * GIB, 2: 4 * GIB})
    nvml.claim(gone.pid, {1: 20 * GIB})  # ended without freeing: the driver frees it
    handle = nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetMemoryInfo(handle).used == 10 * GIB
    assert [(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)] == [
        (os.getpid(), 10 * GIB)]
    nvml.claim(os.getpid(), {})
    assert nvml.nvmlDeviceGetMemoryInfo(handle).free == 48 * GIB

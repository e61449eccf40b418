"""Every GPU of the pod, through a real orchestrator over the stand-in NVML (tests/fakes/nvml: a mock
of the driver, which cannot run here): the inventory its own CUDA_VISIBLE_DEVICES allows, the budget
of the device services land on, what /status shows, and MIG refused before serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import ORCHESTRATOR, REPO, fake_model, write_config

ADMIN = "admin-key-gpus"
GIB = 1024**3


def fake_driver(tmp_path: Path, *cards: dict[str, Any]) -> dict[str, str]:
    """The environment that makes the orchestrator (and its children) see ``cards`` through NVML."""
    devices = [{"uuid": f"GPU-{i:02d}{'ab' * 6}", "pci_bus_id": f"00000000:{0x41 + i:02x}:00.0", **card}
               for i, card in enumerate(cards)]
    spec = tmp_path / "nvml.json"
    spec.write_text(json.dumps({"devices": devices, "used": str(tmp_path / "nvml-used.json")}))
    path = os.pathsep.join([str(REPO / "tests" / "fakes" / "nvml"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"AIO_FAKE_NVML": str(spec), "PYTHONPATH": path, "AIO_ADMIN_KEYS": ADMIN}


H100 = {"name": "NVIDIA H100 80GB HBM3", "total_gb": 80}
RTX4090 = {"name": "NVIDIA GeForce RTX 4090", "total_gb": 24}


def test_under_a_mask_the_orchestrator_places_on_its_own_gpus_only(orchestrator: Any, tmp_path: Path) -> None:
    env = fake_driver(tmp_path, H100, H100, RTX4090, RTX4090)
    env.update(CUDA_VISIBLE_DEVICES="2,3", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    orch = orchestrator({"a": fake_model("a", vram_gb=10)}, env=env, gpu_memory_gb="auto",
                        gpu_process_overhead_gb=0, env_passthrough=["AIO_FAKE_NVML"])  # children see the driver too
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    assert [(g["index"], g["name"], g["total_gb"], g["used_gb"]) for g in status["gpus"]] == [
        (2, "NVIDIA GeForce RTX 4090", 24.0, 0.0), (3, "NVIDIA GeForce RTX 4090", 24.0, 0.0)]
    assert status["gpu_budget_gb"] == 24.0  # the first card it may use (GPU 0's 80 GB is not ours)
    body = {"model": "a", "messages": [{"role": "user", "content": "hello"}]}
    assert httpx.post(orch.url + "/v1/chat/completions", json=body, headers=orch.admin_headers,
                      timeout=60).status_code == 200
    devices = httpx.get(orch.url + "/upstream/a/whoami", headers=orch.admin_headers, timeout=10).json()["devices"]
    assert devices == {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "AIO_VRAM_GB": "10"}
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    assert [g["used_gb"] for g in status["gpus"]] == [10.0, 0.0]  # on GPU 2, CUDA's cuda:0 under the mask
    assert status["models"]["a"]["vram_used_gb"] == 10.0
    assert "GPUs: 2 NVIDIA GeForce RTX 4090 24 GB GPU-02" in orch.log()


def test_without_a_mask_every_gpu_is_listed_and_the_first_sets_the_budget(orchestrator: Any, tmp_path: Path) -> None:
    orch = orchestrator({"a": fake_model("a")}, env=fake_driver(tmp_path, RTX4090, H100), gpu_memory_gb="auto")
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    assert [(g["index"], g["pci_bus_id"]) for g in status["gpus"]] == [(0, "00000000:41:00.0"), (1, "00000000:42:00.0")]
    assert status["gpu_budget_gb"] == 24.0


def test_a_gpu_in_mig_mode_is_refused_before_serving(tmp_path: Path) -> None:
    env = {**os.environ, **fake_driver(tmp_path, H100, {**H100, "mig": True})}
    config = write_config(tmp_path, {"a": fake_model("a")})
    done = subprocess.run([sys.executable, str(ORCHESTRATOR), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "GPU 1 is in MIG mode" in done.stderr and "nvidia-smi -i 1 -mig 0" in done.stderr
    assert "Traceback" not in done.stderr

"""Every GPU of the pod on a real GPU machine (``gpu``: skipped without one): what the stand-in NVML of
tests/integration/test_gpus.py cannot prove. The inventory is the driver's own list, and a service
placed on a GPU finds that very card as its cuda:0 (CUDA's order is NVML's under PCI_BUS_ID)."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest

from core.host.gpu import gpu_inventory
from tests.integration.conftest import fake_model

pytestmark = pytest.mark.gpu

ADMIN = {"AIO_ADMIN_KEYS": "admin-key-real-gpus"}


def nvidia_smi() -> list[tuple[int, str]]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True).stdout
    return [(int(index), uuid.strip()) for index, uuid in (line.split(",") for line in out.strip().splitlines())]


def test_the_inventory_is_the_drivers_list() -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (pip install '.[gpu]')")
    gpus = gpu_inventory({})
    assert gpus is not None
    assert [(g.index, g.uuid) for g in gpus] == nvidia_smi()


def test_each_placed_service_finds_its_own_card_as_cuda_0(orchestrator: Any) -> None:
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (pip install '.[gpu]')")
    pytest.importorskip("torch")
    cards = dict(nvidia_smi())
    # One model per GPU, each too big to share one: placement must give every model a card of its own.
    total = min(g.total_gb for g in gpu_inventory({}) or [])
    models = {f"m{i}": fake_model(f"m{i}", "--report-cuda", vram_gb=round(total * 0.6, 1)) for i in cards}
    orch = orchestrator(models, env=ADMIN, gpu_process_overhead_gb=0)
    seen = {}
    for name in models:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
        headers = orch.admin_headers
        assert httpx.post(orch.url + "/v1/chat/completions", json=body, headers=headers, timeout=120).status_code == 200
        who = httpx.get(f"{orch.url}/upstream/{name}/whoami", headers=headers, timeout=30).json()
        index = int(who["devices"]["CUDA_VISIBLE_DEVICES"])
        assert who["devices"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert who["cuda"] == [cards[index].removeprefix("GPU-")] or who["cuda"] == [cards[index]]
        seen[name] = index
    assert sorted(seen.values()) == sorted(cards)  # each on a card of its own

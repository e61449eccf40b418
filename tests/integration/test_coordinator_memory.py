"""Before every start the coordinator waits until the GPU has room for the model (real fake services).

On a pod ``memory_released`` is core.host.gpu.wait_for_free_memory (NVML); here a recorder stands in
for it, since there is no GPU to ask. What is tested is when it is awaited, and with how much.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from core.config.load import config_from_dict
from core.host.memory_share import WHOLE_GPU_UTILIZATION
from core.service_manager import ServiceManager
from core.supervision.service_state import ServiceState
from model_orchestrator.coordinator import Coordinator
from tests.integration.conftest import REPO, fake_model

pytestmark = pytest.mark.integration
BUDGET = 40.0


def run_scenario(tmp_path: Path, models: dict[str, Any], loads: list[str]) -> list[tuple[float, dict[str, str]]]:
    """Load ``loads`` in order; return what each memory wait was asked for, and the states at that moment."""
    raw = {"settings": {"log_dir": str(tmp_path / "logs"), "base_dir": str(REPO), "gpu_memory_gb": BUDGET},
           "models": models}
    config = config_from_dict(raw, tmp_path / "models.yaml")
    waits: list[tuple[float, dict[str, str]]] = []

    async def main() -> None:
        manager = ServiceManager(config, use_reaper=False)

        async def released(need_gb: float, devices: tuple[int, ...]) -> None:
            assert devices == ()  # one GPU of BUDGET: the default one, not named
            waits.append((need_gb, {name: svc.state.value for name, svc in manager.services.items()}))

        coordinator = Coordinator(manager, config.settings, BUDGET, memory_released=released)
        try:
            for name in loads:
                await coordinator.load(name)
                assert manager[name].state is ServiceState.READY
        finally:
            await manager.shutdown()
    asyncio.run(main())
    return waits


def test_every_gpu_start_waits_for_its_share_even_without_an_eviction(tmp_path: Path) -> None:
    models = {"a": fake_model("a", vram_gb=10), "b": fake_model("b", vram_gb=5), "cpu": fake_model("cpu", vram_gb=0)}
    waits = run_scenario(tmp_path, models, ["a", "cpu", "b"])
    assert [need for need, _ in waits] == [10, 5]  # none for the CPU-only model


def test_a_whole_gpu_model_waits_for_the_gpu_and_only_after_the_evicted_one_stopped(tmp_path: Path) -> None:
    models = {"a": fake_model("a", vram_gb=10), "whole": fake_model("whole")}
    waits = run_scenario(tmp_path, models, ["a", "whole"])
    (need, states) = waits[-1]
    assert need == pytest.approx(BUDGET * WHOLE_GPU_UTILIZATION)
    assert states["a"] == "stopped" and states["whole"] == "starting"

"""models.yaml's GPU keys (settings.gpus; a model's gpus, tensor_parallel, placement), what a child is told
of its GPUs, and the orchestrator's list of GPUs with their budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.common.contract import TENSOR_PARALLEL_ENV
from core.config.launch import service_argv
from core.config.load import config_from_dict
from core.config.schema import ConfigError, ModelSpec, Settings
from core.host.gpu_inventory import Gpu, InventoryError
from core.supervision.child_env import placed_env, service_env
from model_orchestrator.model_view import Want
from model_orchestrator.orchestrator import placement_devices
from model_orchestrator.placement import Device, utilization_fill, want_for

GIB = 1024**3


def config(model: dict[str, Any] | None = None, **settings: Any) -> Any:
    raw = {"settings": settings, "models": {"m": {"type": "text", "command": "serve --port {port}", "port": 8001,
                                                   **(model or {})}}}
    return config_from_dict(raw, Path("models.yaml"))


def problem(model: dict[str, Any] | None = None, **settings: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config(model, **settings)
    return str(info.value)


def test_the_keys_and_their_defaults() -> None:
    spec = config().models["m"]
    assert (spec.gpus, spec.tensor_parallel, spec.placement) == (None, 1, None)
    assert Settings().gpus.model_dump() == {"devices": None, "reserve_gb": 0.0, "placement": "pack", "cap_gb": {}}
    assert spec.peer_to_peer
    loaded = config({"gpus": [1, "GPU-8c1f"], "tensor_parallel": 2, "placement": "spread"},
                    gpus={"devices": [0, 1], "reserve_gb": 1.5, "placement": "spread"})
    assert loaded.models["m"].gpus == [1, "GPU-8c1f"] and loaded.settings.gpus.reserve_gb == 1.5


@pytest.mark.parametrize(("model", "settings", "message"), [
    ({"gpus": [-1]}, {}, "model 'm': key 'gpus'"),
    ({"gpus": []}, {}, "model 'm': key 'gpus'"),
    ({"tensor_parallel": 0}, {}, "model 'm': key 'tensor_parallel'"),
    ({"placement": "fill"}, {}, "model 'm': key 'placement'"),
    ({"gpus": [1], "tensor_parallel": 2}, {}, "key 'gpus': 1 GPU(s) cannot hold tensor_parallel 2"),
    ({"env": {"CUDA_VISIBLE_DEVICES": "1"}}, {}, "pin the model with 'gpus: [...]' instead"),
    ({}, {"gpus": {"reserve_gb": -1}}, "key 'settings.gpus.reserve_gb'"),
    ({}, {"gpus": {"devices": [0], "spread": True}},
     "key 'settings.gpus.spread': unknown key (allowed: devices, reserve_gb, placement, cap_gb)"),
    ({}, {"gpus": {"cap_gb": {0: -2}}}, "key 'settings.gpus.cap_gb.0'"),
    ({}, {"gpus": {"cap_gb": {-1: 20}}}, "key 'settings.gpus.cap_gb'"),
])
def test_mistakes_name_the_key(model: dict[str, Any], settings: dict[str, Any], message: str) -> None:
    assert message in problem(model, **settings)


def test_a_child_is_told_its_gpus_and_its_span() -> None:
    assert placed_env((2, 3)) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert placed_env(()) == {}  # not placed (no GPU accounting): the inherited mask stands
    spec = ModelSpec(type="text", command="serve", port=8001, tensor_parallel=2, vram_gb=20)
    env = service_env(spec, base={"PATH": "/bin", TENSOR_PARALLEL_ENV: "8"})
    assert env[TENSOR_PARALLEL_ENV] == "2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    single = service_env(ModelSpec(type="text", command="serve", port=8001), base={TENSOR_PARALLEL_ENV: "8"})
    assert TENSOR_PARALLEL_ENV not in single  # never another model's span
    assert "NCCL_P2P_DISABLE" not in env
    pcie = ModelSpec(type="text", command="serve", port=8001, tensor_parallel=2, peer_to_peer=False)
    assert service_env(pcie)["NCCL_P2P_DISABLE"] == "1"
    argv = service_argv(ModelSpec(type="text", command="vllm serve x --tensor-parallel-size {tensor_parallel}",
                                  port=8001, tensor_parallel=4), "python", Path("/srv"))
    assert argv[-2:] == ["--tensor-parallel-size", "4"]


def gpu(index: int, total_gb: float, name: str = "NVIDIA RTX A6000") -> Gpu:
    return Gpu(index, f"GPU-{index}{index}aa", f"00000000:{index + 1:02x}:00.0", name, int(total_gb * GIB))


def test_each_gpu_gets_its_budget_and_the_chosen_ones_only() -> None:
    gpus = [gpu(0, 48), gpu(1, 48), gpu(2, 24, "NVIDIA GeForce RTX 4090")]
    a6000, rtx = f"NVIDIA RTX A6000 {48 * GIB}", f"NVIDIA GeForce RTX 4090 {24 * GIB}"
    assert placement_devices(gpus, Settings()) == [
        Device(0, 48.0, a6000, "GPU-00aa", 48.0), Device(1, 48.0, a6000, "GPU-11aa", 48.0),
        Device(2, 24.0, rtx, "GPU-22aa", 24.0)]
    capped = placement_devices(gpus, Settings(gpu_memory_gb=40, gpus={"reserve_gb": 2, "devices": [2, "GPU-0"]}))
    assert [(d.index, d.budget_gb) for d in capped] == [(0, 38.0), (2, 38.0)]  # a number is each GPU's budget
    assert want_for([1, "GPU-22"], 1, "pack", placement_devices(gpus, Settings())) == Want(1, frozenset({1, 2}))
    assert want_for(["GPU-9"], 1, "pack", placement_devices(gpus, Settings())).allowed == frozenset()
    caps = Settings(gpus={"reserve_gb": 1, "cap_gb": {"GPU-1": 20, 2: 30}})  # 30: over GPU 2's total
    assert [d.budget_gb for d in placement_devices(gpus, caps)] == [47.0, 19.0, 23.0]
    assert [d.budget_gb for d in placement_devices(gpus, Settings(gpu_memory_gb=10, gpus={"cap_gb": {0: 20}}))] == [
        10.0, 10.0, 10.0]  # a cap only ever lowers a budget


@pytest.mark.parametrize("gpus", [{"devices": [0, 7]}, {"cap_gb": {"GPU-9": 20}}])
def test_settings_naming_a_gpu_the_pod_lacks_are_refused(gpus: dict[str, Any]) -> None:
    with pytest.raises(InventoryError, match=r"settings\.gpus\.\w+ names GPU (7|'GPU-9'), which is none of "
                                             r"the GPUs the orchestrator may use \(0 GPU-00aa, 1 GPU-11aa, "):
        placement_devices([gpu(0, 48), gpu(1, 48)], Settings(gpus=gpus))
    assert placement_devices([], Settings(gpus=gpus)) == []  # no GPU at all (CPU services): nothing to place on


def test_a_start_fills_gpu_memory_utilization_from_its_gpus() -> None:
    h100, l40 = Device(1, 70.0, "H100", total_gb=80.0), Device(2, 40.0, "L40S", total_gb=48.0)
    assert utilization_fill(20, (1,), [h100, l40], None) == "0.25"  # of the card's total, not its budget
    assert utilization_fill(12, (1, 2), [h100, l40], None) == "0.25"  # the smaller card decides
    assert utilization_fill(None, (1,), [h100], None) == "0.9"  # a whole-GPU model: vLLM's share
    assert utilization_fill(6, (), [], 24.0) == "0.25"  # one GPU of a configured budget
    assert utilization_fill(6, (), [], None) == "0.9"  # nothing known: vLLM's share
    assert utilization_fill(0, (1,), [h100], None) == "0"  # no GPU share (a CPU service)
    assert utilization_fill(90, (1,), [h100], None) == "1"  # past the card: the service's check refuses it
    argv = service_argv(ModelSpec(type="text", command="vllm serve x --gpu-memory-utilization {gpu_memory_utilization}",
                                  port=8001), "python", Path("/srv"))
    assert argv[-1] == "{gpu_memory_utilization}"  # left for each start, which knows its GPUs


def test_the_memory_wait_is_per_placed_gpu_and_keeps_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from model_orchestrator import orchestrator

    asked: list[tuple[float, int]] = []

    async def wait_for_free_memory(need_gb: float, index: int = 0) -> None:  # NVML's, recorded
        asked.append((need_gb, index))

    monkeypatch.setattr(orchestrator, "wait_for_free_memory", wait_for_free_memory)
    asyncio.run(orchestrator._memory_released(2, 1.5, 10.0, (3, 5)))
    asyncio.run(orchestrator._memory_released(2, 0.0, 4.0, ()))  # a start not placed: the first GPU
    assert asked == [(11.5, 3), (11.5, 5), (4.0, 2)]

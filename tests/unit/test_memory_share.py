"""GPU shares: the arithmetic, the refusals, and how torch is told (a stand-in torch plays the GPU)."""

from __future__ import annotations

import gc
import logging
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from core.host.memory_share import (
    GIB,
    VRAM_ENV,
    WHOLE_GPU_UTILIZATION,
    ShareError,
    cap_torch_memory,
    device_total_bytes,
    memory_fraction,
    nvml_index,
    release_cached_memory,
    share_from_env,
    vllm_utilization,
)

H100 = 85_031_714_816  # what an H100 80GB reports as total_memory: 79.19 GiB
GPU_80 = 80 * GIB


@pytest.mark.parametrize(("raw", "expected"), [
    (None, None), ("", None), ("  ", None), ("6", 6.0), (" 0.5 ", 0.5), ("0", 0.0), ("36", 36.0)])
def test_share_from_env(raw: str | None, expected: float | None) -> None:
    environ = {} if raw is None else {VRAM_ENV: raw}
    assert share_from_env(environ) == expected


@pytest.mark.parametrize("raw", ["six", "6GB", "-1", "nan", "inf"])
def test_share_from_env_refuses_non_numbers(raw: str) -> None:
    with pytest.raises(ShareError, match=VRAM_ENV):
        share_from_env({VRAM_ENV: raw})


def test_share_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VRAM_ENV, "22")
    assert share_from_env() == 22.0
    monkeypatch.delenv(VRAM_ENV)
    assert share_from_env() is None


@pytest.mark.parametrize(("share", "total", "expected"), [
    (8, GPU_80, 0.1), (80, GPU_80, 1.0), (1, GPU_80, 1 / 80), (36, H100, 36 * GIB / H100),
    (1, 141 * GIB, 1 / 141),  # a small embedding model on an H200: under 1% and fine
    (0.1, GPU_80, 0.1 / 80)])
def test_memory_fraction(share: float, total: int, expected: float) -> None:
    assert memory_fraction(share, total) == pytest.approx(expected)


def test_share_larger_than_the_gpu_is_refused_with_what_to_change() -> None:
    with pytest.raises(ShareError) as caught:
        memory_fraction(80, H100)  # "80 GB" cards have 79.2 GiB
    assert str(caught.value) == ("vram_gb 80 GiB is more than this GPU has (79.2 GiB): lower vram_gb in "
                                 "models.yaml, or leave it unset to give the model the whole GPU")


@pytest.mark.parametrize(("share", "total", "words"), [
    (0, GPU_80, "--device cpu"), (0.05, GPU_80, "under 0.1 GiB"), (float("nan"), GPU_80, "not a number"),
    (-1, GPU_80, "not a number"), (8, 0, "reports 0 bytes")])
def test_impossible_shares_are_refused(share: float, total: int, words: str) -> None:
    with pytest.raises(ShareError, match=words):
        memory_fraction(share, total)


def test_vllm_utilization_for_the_whole_gpu() -> None:
    assert vllm_utilization(None, H100) == WHOLE_GPU_UTILIZATION


@pytest.mark.parametrize(("share", "total", "expected"), [
    (8, GPU_80, 0.1),  # exact quotients stay exact
    (22, GPU_80, 0.275),
    (22, H100, 0.2778),  # 0.27780...
    (36, H100, 0.4545),  # 0.45459...: round() would give 0.4546, past the share
    (1, 141 * GIB, 0.007),  # 0.00709... rounds down
    (80, GPU_80, 1.0)])
def test_vllm_utilization_rounds_down_to_four_decimals(share: float, total: int, expected: float) -> None:
    utilization = vllm_utilization(share, total)
    assert utilization == expected
    assert utilization * total <= share * GIB  # never more than the share
    assert share * GIB - utilization * total < 1e-4 * total  # and at most one step below it


def test_vllm_utilization_refuses_what_torch_refuses() -> None:
    with pytest.raises(ShareError, match="more than this GPU has"):
        vllm_utilization(100, GPU_80)


class FakeCuda:
    """The torch.cuda calls core.host.memory_share makes, recorded: a GPU of ``total`` bytes."""

    def __init__(self, total: int, initialized: bool = True) -> None:
        self.total, self.initialized = total, initialized
        self.fractions: list[tuple[float, Any]] = []
        self.emptied = 0

    def get_device_properties(self, device: int) -> SimpleNamespace:
        assert isinstance(device, int)
        return SimpleNamespace(total_memory=self.total)

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        assert isinstance(device, int)  # the real one refuses torch.device("cuda"): no index
        self.fractions.append((fraction, device))

    def current_device(self) -> int:
        return 0

    def is_initialized(self) -> bool:
        return self.initialized

    def empty_cache(self) -> None:
        self.emptied += 1


def fake_device(name: str) -> SimpleNamespace:
    kind, _, index = name.partition(":")
    return SimpleNamespace(type=kind, index=int(index) if index else None)


def install_fake_torch(monkeypatch: pytest.MonkeyPatch, cuda: FakeCuda) -> None:
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda, device=fake_device))


def test_cap_sets_the_fraction_on_the_device(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    cuda = FakeCuda(GPU_80)
    install_fake_torch(monkeypatch, cuda)
    with caplog.at_level(logging.INFO, logger="core.host.memory_share"):
        assert cap_torch_memory(8, "cuda") == pytest.approx(0.1)
        assert cap_torch_memory(20, "cuda:1") == pytest.approx(0.25)
    assert cuda.fractions == [(pytest.approx(0.1), 0), (pytest.approx(0.25), 1)]  # "cuda": the current device
    assert "GPU share: 8 GiB of 80.0 GiB on cuda (torch memory fraction 0.1000)" in caplog.text
    assert device_total_bytes("cuda:0") == GPU_80


def test_cap_refuses_a_share_past_the_gpu_before_touching_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(GPU_80)
    install_fake_torch(monkeypatch, cuda)
    with pytest.raises(ShareError, match=r"vram_gb 100 GiB is more than this GPU has \(80.0 GiB\)"):
        cap_torch_memory(100, "cuda")
    assert cuda.fractions == []


def test_no_share_leaves_the_gpu_uncapped(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(GPU_80)
    install_fake_torch(monkeypatch, cuda)
    assert cap_torch_memory(None, "cuda") is None
    assert cuda.fractions == []


def test_cap_on_cpu_is_a_logged_no_op_without_torch(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    with caplog.at_level(logging.INFO, logger="core.host.memory_share"):
        assert cap_torch_memory(6, "cpu") is None
        assert cap_torch_memory(None, "cpu") is None
    assert device_total_bytes("cpu") is None
    assert "torch" not in sys.modules
    assert caplog.messages == ["GPU share 6 GiB not applied: the model runs on cpu"]


def record_collections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    generations: list[int] = []

    def collect(generation: int = 2) -> int:
        generations.append(generation)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    return generations


def test_release_empties_the_cuda_cache_after_a_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(GPU_80)
    install_fake_torch(monkeypatch, cuda)
    generations = record_collections(monkeypatch)
    release_cached_memory()
    release_cached_memory(full_collection=False)
    assert generations == [2, 1]
    assert cuda.emptied == 2


def test_release_without_cuda_in_use_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(GPU_80, initialized=False)  # a CPU service: torch loaded, CUDA never touched
    install_fake_torch(monkeypatch, cuda)
    generations = record_collections(monkeypatch)
    release_cached_memory()
    assert (generations, cuda.emptied) == ([], 0)
    monkeypatch.delitem(sys.modules, "torch")
    release_cached_memory()
    assert "torch" not in sys.modules  # it never imports torch itself
    assert generations == []


@pytest.mark.parametrize(("cuda_index", "environ", "expected"), [
    (0, {}, 0),  # no mask: CUDA's order is NVML's (the orchestrator sets PCI_BUS_ID)
    (0, {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, 2),  # a placed child's cuda:0
    (1, {"CUDA_VISIBLE_DEVICES": "2, 3", "CUDA_DEVICE_ORDER": "pci_bus_id"}, 3),
    (2, {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, None),  # past the mask
    (0, {"CUDA_VISIBLE_DEVICES": "2,3"}, None),  # fastest-first order: only CUDA knows
    (0, {"CUDA_VISIBLE_DEVICES": "GPU-8c1f", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, None),  # a UUID: only CUDA knows
    (0, {"CUDA_VISIBLE_DEVICES": ""}, None),  # no GPU at all
])
def test_a_childs_cuda_index_is_read_as_nvmls_without_cuda(cuda_index: int, environ: dict[str, str],
                                                           expected: int | None) -> None:
    assert nvml_index(cuda_index, environ) == expected

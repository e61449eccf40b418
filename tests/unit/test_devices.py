"""Device choice: `auto` never falls back to CPU on a host that has an NVIDIA GPU."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.runtime.devices import DeviceError, choose_device, host_nvidia_gpus, resolve_device, torch_build

CPU_BUILD = torch_build("2.13.0+cpu", None)
CUDA_BUILD = torch_build("2.14.0+cu130", "13.0")
GPU = ["0000:01:00.0"]


def test_build_descriptions() -> None:
    assert CPU_BUILD == "torch 2.13.0+cpu (a CPU-only build)"
    assert CUDA_BUILD == "torch 2.14.0+cu130 (built for CUDA 13.0)"


@pytest.mark.parametrize(("choice", "torch_cuda", "host_gpus", "expected"), [
    ("auto", True, GPU, "cuda"),
    ("auto", False, [], "cpu"),  # a machine without a GPU: CPU is the only choice
    ("cuda", True, GPU, "cuda"),
    ("cuda:1", True, GPU, "cuda:1"),
    ("cpu", True, GPU, "cpu"),  # deliberate CPU on a GPU host
    ("cpu", False, GPU, "cpu"),
])
def test_usable_choices(choice: str, torch_cuda: bool, host_gpus: list[str], expected: str) -> None:
    assert choose_device(choice, torch_cuda=torch_cuda, host_gpus=host_gpus, build=CPU_BUILD) == expected


def test_auto_refuses_cpu_on_a_gpu_host_with_a_cpu_torch() -> None:
    with pytest.raises(DeviceError) as caught:
        choose_device("auto", torch_cuda=False, host_gpus=GPU, build=CPU_BUILD)
    message = str(caught.value)
    assert "0000:01:00.0" in message
    assert "torch 2.13.0+cpu (a CPU-only build) cannot use it" in message
    assert "Install a torch build that matches the driver" in message
    assert "--device cpu" in message


def test_auto_refusal_names_the_cuda_build_and_visible_devices() -> None:
    with pytest.raises(DeviceError) as caught:
        choose_device("auto", torch_cuda=False, host_gpus=["/dev/nvidia0"], build=CUDA_BUILD, visible_devices="")
    message = str(caught.value)
    assert "/dev/nvidia0" in message and "built for CUDA 13.0" in message
    assert "CUDA_VISIBLE_DEVICES is ''" in message


@pytest.mark.parametrize("host_gpus", [[], GPU])
def test_cuda_without_torch_cuda_fails_clearly(host_gpus: list[str]) -> None:
    with pytest.raises(DeviceError, match="--device cuda was requested, but torch sees no CUDA device") as caught:
        choose_device("cuda", torch_cuda=False, host_gpus=host_gpus, build=CPU_BUILD)
    assert "a CPU-only build" in str(caught.value)
    assert ("0000:01:00.0" if host_gpus else "no NVIDIA GPU") in str(caught.value)


def test_host_gpus_from_the_driver_proc_folder(tmp_path: Path) -> None:
    proc, dev = tmp_path / "gpus", tmp_path / "dev"
    for address in ("0000:c1:00.0", "0000:01:00.0"):
        (proc / address).mkdir(parents=True)
    dev.mkdir()
    assert host_nvidia_gpus(proc, dev) == ["0000:01:00.0", "0000:c1:00.0"]


def test_host_gpus_from_device_nodes(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    # The control and UVM nodes exist without a GPU being visible; only nvidiaN counts.
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-modeset", "nvidia0", "nvidia12", "null"):
        (dev / name).touch()
    assert host_nvidia_gpus(tmp_path / "no-proc", dev) == [str(dev / "nvidia0"), str(dev / "nvidia12")]


def test_no_gpus_when_nothing_is_there(tmp_path: Path) -> None:
    assert host_nvidia_gpus(tmp_path / "absent", tmp_path / "absent-dev") == []


def fake_torch(cuda: bool) -> SimpleNamespace:
    """Just what resolve_device reads from torch: keeps torch out of the unit tests and lets them play a GPU."""
    return SimpleNamespace(__version__="2.14.0+cu130", version=SimpleNamespace(cuda="13.0"),
                           cuda=SimpleNamespace(is_available=lambda: cuda))


def test_resolve_device_with_a_usable_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda=True))

    def never() -> list[str]:
        raise AssertionError("the host is only searched when torch sees no GPU")

    assert resolve_device("auto", host_gpus=never) == "cuda"
    assert resolve_device("cuda", host_gpus=never) == "cuda"


def test_resolve_device_on_a_gpu_host_torch_cannot_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda=False))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceError) as caught:
        resolve_device("auto", host_gpus=lambda: GPU)
    message = str(caught.value)
    assert "this host has an NVIDIA GPU (0000:01:00.0), but torch 2.14.0+cu130 (built for CUDA 13.0)" in message
    assert "CUDA_VISIBLE_DEVICES is '0'" in message
    assert resolve_device("cpu", host_gpus=lambda: GPU) == "cpu"


def test_resolve_device_on_a_host_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda=False))
    assert resolve_device("auto", host_gpus=lambda: []) == "cpu"

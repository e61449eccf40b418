"""On a real GPU: the torch services stay inside the share the orchestrator gives them (AIO_VRAM_GB).

Each service runs a tiny model on CUDA with a small share, answers one request, and NVML
must show the process within the share plus ALLOWANCE_GB, the CUDA context and library
handles that torch's allocator does not count (about 0.5 GiB per process on an H100).
One test checks the mechanism itself: past the share, torch raises OutOfMemoryError in
that process instead of taking more of the GPU. Skipped without an NVIDIA GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.host.memory_share import GIB, VRAM_ENV
from tests.integration.conftest import REPO, running_service, wait_until

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

SHARE_GB = 1.0
ALLOWANCE_GB = 1.5  # the CUDA context and loaded kernels: memory torch's allocator never counts


@pytest.fixture(scope="module")
def nvml() -> Iterator[Any]:
    pynvml = pytest.importorskip("pynvml")  # nvidia-ml-py, the orchestrator's `gpu` extra
    pynvml.nvmlInit()
    yield pynvml
    pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built in a child process: torch (and CUDA) stay out of the test process.
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "models.build_tiny", str(out), "--only", "image", "--only", "music"],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True, timeout=300)
    return out


def device_used_bytes(nvml: Any) -> int:
    return sum(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).used
               for i in range(nvml.nvmlDeviceGetCount()))


def process_gpu_bytes(nvml: Any, pid: int, baseline: int) -> int:
    """GPU memory of process ``pid``: NVML's per-process figure, or, where NVML lists processes
    by host pid (inside a container), how much the device's use grew since ``baseline``."""
    figures = [proc.usedGpuMemory for i in range(nvml.nvmlDeviceGetCount())
               for proc in nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(i))
               if proc.pid == pid and proc.usedGpuMemory is not None]
    return sum(figures) if figures else device_used_bytes(nvml) - baseline


def service_output(proc: subprocess.Popen[bytes]) -> str:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    return proc.stdout.read().decode(errors="replace")


def assert_within_share(nvml: Any, script: str, args: tuple[str, ...], path: str, body: dict[str, Any],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VRAM_ENV, f"{SHARE_GB:g}")
    baseline = device_used_bytes(nvml)
    with running_service(script, "--device", "cuda", *args) as (proc, url):
        response = httpx.post(url + path, json=body, timeout=300)
        assert response.status_code == 200, response.text
        used = process_gpu_bytes(nvml, proc.pid, baseline)
        log = service_output(proc)
    assert f"GPU share: {SHARE_GB:g} GiB of" in log, log[-3000:]
    assert 0 < used <= (SHARE_GB + ALLOWANCE_GB) * GIB, f"{used / GIB:.2f} GiB used"
    print(f"{script}: {used / GIB:.2f} GiB on the GPU with a {SHARE_GB:g} GiB share")


def test_flux_stays_within_its_share(nvml: Any, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 256x256 decodes through the tiny VAE's tiles; n=2 through its slices.
    body = {"prompt": "a red fox", "size": "256x256", "n": 2, "seed": 1, "num_inference_steps": 2}
    assert_within_share(nvml, "models/flux/server.py", ("--model", str(tiny / "image"), "--default-steps", "1"),
                        "/v1/images/generations", body, monkeypatch)


def test_musicgen_stays_within_its_share(nvml: Any, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"input": "calm piano", "voice": "alloy", "duration": 2.0, "seed": 1}
    assert_within_share(nvml, "models/musicgen/server.py", ("--model", str(tiny / "music")),
                        "/v1/audio/speech", body, monkeypatch)


def test_embeddings_stays_within_its_share(nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"input": ["a cat sits on the mat"] * 256}
    assert_within_share(nvml, "models/embeddings/server.py", (), "/v1/embeddings", body, monkeypatch)


def test_a_share_larger_than_the_gpu_fails_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VRAM_ENV, "100000")
    with running_service("models/embeddings/server.py", "--device", "cuda", wait_ready=False) as (proc, _):
        assert wait_until(lambda: proc.poll() is not None, 120)
        log = service_output(proc)
    assert proc.returncode != 0
    assert "vram_gb 100000 GiB is more than this GPU has" in log, log[-3000:]


# Allocate inside the share, then past it: the second allocation must fail in this process.
_CAPPED = """
import torch
from core.host.memory_share import GIB, cap_torch_memory
fraction = cap_torch_memory(1.0, "cuda")
assert torch.cuda.get_per_process_memory_fraction() == fraction, fraction
inside = torch.empty(GIB // 2, dtype=torch.uint8, device="cuda")
try:
    torch.empty(GIB, dtype=torch.uint8, device="cuda")
except torch.OutOfMemoryError:
    print("refused", torch.cuda.memory_reserved() / GIB)
else:
    print("allocated past the share")
"""


def test_torch_refuses_allocations_past_the_share() -> None:
    done = subprocess.run([sys.executable, "-c", _CAPPED], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused "), done.stdout
    assert float(done.stdout.split()[1]) <= 1.0  # what torch holds never passed the share

"""The text service on a CUDA GPU with the tiny Qwen2 model (skipped without a GPU: tests/conftest.py).

Needs the GPU stack in the test environment: ``vllm`` (CUDA build) and ``nvidia-ml-py`` (pynvml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.models import text_cases
from tests.models.text_cases import text_service

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.timeout(900)]

SHARE_GIB = 4
# Outside vLLM's gpu_memory_utilization budget: a CUDA context per process that touches the GPU
# (the engine's worker, and the service process, which reads the device's size through torch),
# about 0.5 GiB each on recent drivers.
CONTEXT_ALLOWANCE_GIB = 1.5


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-qwen")


def gpu_memory_of(processes: list[Any]) -> int:
    """Bytes of GPU memory NVML reports in use by these processes, on every GPU."""
    import pynvml

    pids = {proc.pid for proc in processes}
    pynvml.nvmlInit()
    try:
        used = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for info in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if info.pid in pids and info.usedGpuMemory is not None:
                    used += int(info.usedGpuMemory)
        return used
    finally:
        pynvml.nvmlShutdown()


def test_vllm_keeps_to_its_gpu_share(tiny_text: Path) -> None:
    with text_service("--model", str(tiny_text), "--engine", "vllm", "--served-model-name", "tiny",
                      "--max-model-len", "1024", "--enforce-eager", env={"AIO_VRAM_GB": str(SHARE_GIB)}) as service:
        service.log.wait_for(rf"gpu_memory_utilization: 0\.\d+ \(vram_gb {SHARE_GIB} GiB of")
        reply = service.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "length" and reply.usage is not None
        assert reply.usage.completion_tokens == 8
        used = gpu_memory_of(service.tree())
        assert used > 0, "NVML sees no GPU memory in the service's processes: is vLLM on the GPU?"
        assert used <= (SHARE_GIB + CONTEXT_ALLOWANCE_GIB) * 1024**3, f"{used / 1024**3:.2f} GiB in use"


def test_transformers_on_cuda(tiny_text: Path) -> None:
    with text_service("--model", str(tiny_text), "--engine", "transformers", "--device", "cuda") as service:
        reply = text_cases.chat(service.url, max_tokens=6, temperature=0, ignore_eos=True)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 6

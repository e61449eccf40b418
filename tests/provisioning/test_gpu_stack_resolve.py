"""What the GPU environment installs on the design's image, resolved as the playbook's pip does it.

The playbook fills the models environment over the image's Python with
``pip install -c constraints.txt -r <the stack's requirements>``, the constraint holding torch to
the image's build (roles/aio/tasks/dependencies_env_system.yml). Installing the torch 2.9.1 stack
for real would download about 5 GB of CUDA wheels, which CI cannot afford, so pip resolves it
here for the image's platform (CPython 3.12, manylinux x86_64) with ``--dry-run --report``,
reading metadata only: PyPI's torch 2.9.1 plays the image's (the same version and CUDA 12.8
libraries). The torch 2.13 stack is installed for real by the GPU rehearsal (test_gpu_rehearsal.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.host.gpu_stack import STACKS, stack_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
DESIGN_IMAGE_TORCH = "2.9.1+cu128"  # runpod/pytorch:1.0.3-cu1281-torch291-ubuntu2204
# The image's platform: glibc 2.35 (Ubuntu 22.04). pip takes --platform literally, so every older tag too.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{distribution: version} pip would install for the design image's stack."""
    stack = stack_for(DESIGN_IMAGE_TORCH)
    assert stack is not None
    scratch = tmp_path_factory.mktemp("resolve")
    (scratch / "constraints.txt").write_text(f"torch=={stack.torch}\n")  # as the playbook writes it
    report = scratch / "report.json"
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    # This machine's own pip settings (a local wheel folder, a torch cap) are not the pod's.
    env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--only-binary=:all:",
         "--python-version", "3.12", *platforms, "--target", str(scratch / "target"), "--report", str(report),
         "-c", str(scratch / "constraints.txt"), "-r", str(REPO / stack.requirements)],
        capture_output=True, text=True, timeout=540, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def test_one_torch_the_images_and_the_vllm_built_for_it(resolved: dict[str, str]) -> None:
    stack = stack_for(DESIGN_IMAGE_TORCH)
    assert stack is not None and stack is not STACKS[0]
    assert [name for name in resolved if name == "torch"] == ["torch"] and resolved["torch"] == stack.torch
    assert resolved["vllm"] == stack.vllm
    assert (resolved["torchvision"], resolved["torchaudio"]) == ("0.24.1", "2.9.1")  # built for torch 2.9.1


def test_the_cuda_libraries_are_cuda_12s_and_none_of_cuda_13s(resolved: dict[str, str]) -> None:
    for library in ("nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu12", "nvidia-nccl-cu12", "nvidia-cublas-cu12"):
        assert library in resolved, library  # what the image's torch already has: nothing new to fetch
    assert resolved["nvidia-cuda-runtime-cu12"].startswith("12.8.")
    assert int(resolved["cuda-bindings"].split(".")[0]) == 12  # held below 13 by the stack's requirements
    cuda_13 = {name for name in resolved if name.endswith("-cu13") or name == "cuda-toolkit"}
    # nvidia-cutlass-dsl always pulls both of its kernel-library wheels; it loads the one for the CUDA it finds.
    assert cuda_13 == {"nvidia-cutlass-dsl-libs-cu13"}


def test_the_services_libraries_are_the_ones_vllm_016_fits(resolved: dict[str, str]) -> None:
    assert resolved["transformers"] == "4.57.6" and resolved["diffusers"] == "0.39.0"
    assert resolved["sentence-transformers"] == "5.7.0" and resolved["huggingface-hub"].startswith("0.")

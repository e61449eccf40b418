"""Preflight's verdict on an image's torch, CUDA, driver and toolchain (core/host/gpu_stack.py), as pure functions.

The versions are the ones images really carry: PyPI's CUDA builds (``+cu128``, ``+cu130``), a
patch release, and NGC's source builds (``2.13.0a0+git…``), which pip takes for pre-releases.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.host.gpu_stack import STACKS, Stack, c_compiler, min_driver, pins_match, problems, required_torch, stack_for
from models.vllm.releases import LINES, line_of

REPO = Path(__file__).resolve().parents[2]
NEW_DRIVER, OLD_DRIVER = "580.82.07", "570.195.03"  # either side of CUDA 13's floor (580.65)


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: f"torch{s.torch}")
def test_the_stack_table_is_what_the_requirement_files_install(stack: Stack) -> None:
    text = (REPO / stack.requirements).read_text()
    assert re.search(rf"^vllm=={re.escape(stack.vllm)}\b", text, re.MULTILINE)
    assert not re.search(r"^torch\b", text, re.MULTILINE)  # the image's torch is reused, never listed
    assert line_of(stack.vllm) in LINES  # the text service knows where this release keeps what it uses


def test_the_newest_stack_is_the_one_ci_rehearses_on_cpu() -> None:
    assert STACKS[0].requirements == "models/requirements-gpu.txt"
    assert required_torch() == STACKS[0].torch  # the CPU stack (CI's rehearsal) runs the same torch


@pytest.mark.parametrize(("installed", "pinned", "taken"), [
    ("2.13.0", "2.13.0", True),
    ("2.13.0+cu130", "2.13.0", True),   # the local build label is ignored
    ("2.13.0+cu128", "2.13.0", True),   # (its CUDA is checked on its own)
    ("2.13+cpu", "2.13.0", True),       # trailing zeros pad
    ("2.13.1+cu130", "2.13.0", False),  # another patch release
    ("2.13.0a0+git1234abc", "2.13.0", False),  # NGC's source build: a pre-release to pip
    ("2.13.0.post1", "2.13.0", False),
    ("2.13.0.dev20261101+cu130", "2.13.0", False),
    ("2.9.1+cu128", "2.13.0", False),
])
def test_pins_match_as_pip_does(installed: str, pinned: str, taken: bool) -> None:
    assert pins_match(installed, pinned) is taken


def test_a_matching_cuda_13_image_on_a_new_enough_driver_passes() -> None:
    assert problems("2.13.0+cu130", "13.0", NEW_DRIVER) == []
    assert stack_for("2.13.0+cu130") == STACKS[0]


def test_the_same_torch_built_for_cuda_12_is_refused_for_vllms_cuda_13_kernels() -> None:
    (message,) = problems("2.13.0+cu128", "12.8", NEW_DRIVER)
    assert "CUDA 12.8" in message and "CUDA 13 builds" in message and "vLLM 0.32.0" in message


@pytest.mark.parametrize("torch", ["2.13.1+cu130", "2.13.0a0+git1234abc"])
def test_a_near_miss_torch_is_refused_saying_pip_would_install_a_second_one(torch: str) -> None:
    (message,) = problems(torch, "13.0", NEW_DRIVER)
    assert torch in message and "second torch" in message and "torch 2.13.0 for vLLM 0.32.0" in message


def test_the_design_image_gets_vllm_016_and_its_cuda_12_kernels() -> None:
    # runpod/pytorch:1.0.3-cu1281-torch291-ubuntu2204
    stack = stack_for("2.9.1+cu128")
    assert stack is not None and (stack.vllm, stack.cuda_major) == ("0.16.0", 12)
    assert stack.requirements == "models/requirements-gpu-torch291.txt"
    assert problems("2.9.1+cu128", "12.8", "550.54.15") == []  # CUDA 12 runs on 525+
    assert problems("2.13.0+cu130", "13.0", NEW_DRIVER) == []


def test_a_torch_no_stack_is_built_for_is_refused_naming_both() -> None:
    (message,) = problems("2.10.0+cu128", "12.8", NEW_DRIVER)
    assert "2.10.0+cu128" in message and "no vLLM release" in message
    assert "torch 2.13.0 for vLLM 0.32.0" in message and "torch 2.9.1 for vLLM 0.16.0" in message


def test_the_design_torch_built_for_cuda_13_is_refused_for_vllm_016s_cuda_12_kernels() -> None:
    (message,) = problems("2.9.1+cu130", "13.0", NEW_DRIVER)
    assert "vLLM 0.16.0" in message and "CUDA 12 builds" in message


@pytest.mark.parametrize(("driver", "ok"), [(OLD_DRIVER, False), ("580.65.06", True), (NEW_DRIVER, True)])
def test_the_cuda_13_driver_floor(driver: str, ok: bool) -> None:
    found = problems("2.13.0+cu130", "13.0", driver)
    assert (found == []) is ok
    if not ok:
        assert f"{driver} is too old" in found[0] and "580.65 or newer" in found[0]


@pytest.mark.parametrize(("driver", "ok"), [("520.61.05", False), ("525.60.13", True), ("550.54.15", True)])
def test_the_cuda_12_driver_floor(driver: str, ok: bool) -> None:
    assert (problems("2.9.1+cu128", "12.8", driver) == []) is ok


def test_a_cpu_torch_or_none_is_refused_on_a_pod_but_a_cpu_torch_passes_the_rehearsal() -> None:
    assert "CPU build" in problems("2.13.0+cpu", None, NEW_DRIVER)[0]
    assert "no torch" in problems(None, None, NEW_DRIVER)[0]
    assert problems("2.13.0+cpu", None, None, rehearsal=True) == []


def test_an_image_without_c_headers_or_a_c_compiler_is_refused() -> None:
    (headers,) = problems("2.13.0+cu130", "13.0", NEW_DRIVER, headers=False)
    assert "Python.h" in headers and "-dev" in headers
    (compiler,) = problems("2.13.0+cu130", "13.0", NEW_DRIVER, compiler=False)
    assert "C compiler" in compiler and "gcc" in compiler
    assert len(problems("2.13.0+cpu", None, None, rehearsal=True, compiler=False)) == 1  # the rehearsal checks it too


def test_the_compiler_is_found_as_triton_looks_for_it(tmp_path: Path) -> None:
    assert c_compiler({"CC": "/no/such/cc", "PATH": str(tmp_path)}) is None
    for name in ("clang", "gcc"):  # gcc first, then clang, as Triton's build does
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
        assert c_compiler({"PATH": str(tmp_path)}) == str(tmp_path / name)
    fake = tmp_path / "my-cc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert c_compiler({"CC": str(fake), "PATH": str(tmp_path)}) == str(fake)


def test_no_driver_is_reported() -> None:
    assert "no driver version" in problems("2.13.0+cu130", "13.0", None)[0]


def test_driver_floor_per_cuda_major() -> None:
    assert min_driver("13.0") == (580, 65)
    assert min_driver("12.6") == (525, 60)
    assert min_driver("10.2") is None


def test_the_module_runs_with_the_standard_library_only() -> None:
    """Preflight runs it with the image's Python before any environment exists: no third-party import."""
    argv = [sys.executable, "-S", "-m", "core.host.gpu_stack", "--python", sys.executable, "--rehearsal"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    report = json.loads(done.stdout)
    assert report["required_torch"] == ["2.13.0", "2.9.1"] and report["torch"].startswith("2.13.0")
    assert report["stack"]["vllm"] == "0.32.0" and report["compiler"]
    assert done.returncode == 0 and report["problems"] == []

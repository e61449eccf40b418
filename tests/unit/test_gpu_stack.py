"""Preflight's verdict on an image's torch and driver (core/gpu_stack.py), as pure functions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core.gpu_stack import min_driver, problems, required_torch

REPO = Path(__file__).resolve().parents[2]


def test_the_stack_torch_is_the_one_vllm_pins() -> None:
    assert required_torch() == "2.13.0"


def test_a_matching_cuda_image_on_a_new_enough_driver_passes() -> None:
    assert problems("2.13.0+cu130", "13.0", "580.82.07", "2.13.0") == []
    assert problems("2.13.1+cu128", "12.8", "550.54.15", "2.13.0") == []  # 12.x runs on any 525+ driver


def test_a_cuda_13_torch_on_an_older_driver_is_refused_with_what_to_do() -> None:
    (message,) = problems("2.13.0+cu130", "13.0", "570.195.03", "2.13.0")
    assert "570.195.03 is too old" in message and "580.65 or newer" in message


def test_another_torch_is_refused_naming_both_versions() -> None:
    (message,) = problems("2.9.1+cu128", "12.8", "570.1", "2.13.0")
    assert "2.9.1+cu128" in message and "torch 2.13" in message


def test_a_cpu_torch_or_none_is_refused_on_a_pod_but_a_cpu_torch_passes_the_rehearsal() -> None:
    assert "CPU build" in problems("2.13.0+cpu", None, "580.1", "2.13.0")[0]
    assert "no torch" in problems(None, None, "580.1", "2.13.0")[0]
    assert problems("2.13.0+cpu", None, None, "2.13.0", rehearsal=True) == []


def test_an_image_python_without_c_headers_is_refused() -> None:
    (message,) = problems("2.13.0+cu130", "13.0", "580.82.07", "2.13.0", headers=False)
    assert "Python.h" in message and "-dev" in message


def test_no_driver_is_reported() -> None:
    assert "no driver version" in problems("2.13.0+cu130", "13.0", None, "2.13.0")[0]


def test_driver_floor_per_cuda_major() -> None:
    assert min_driver("13.0") == (580, 65)
    assert min_driver("12.6") == (525, 60)
    assert min_driver("10.2") is None


def test_the_module_runs_with_the_standard_library_only(tmp_path: Path) -> None:
    """Preflight runs it with the image's Python before any environment exists: no third-party import."""
    done = subprocess.run([sys.executable, "-S", "-m", "core.gpu_stack", "--python", sys.executable, "--rehearsal"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    report = json.loads(done.stdout)
    assert report["required_torch"] == "2.13.0" and report["torch"].startswith("2.13.0")
    assert done.returncode == 0 and report["problems"] == []

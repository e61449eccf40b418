"""Every model service imports, and answers --help, without its heavy packages: the orchestrator,
the tests and provisioning import or run them on machines without torch. A new service under
models/ is checked here with no test of its own (docs/ADDING_MODELS.md, step 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = sorted(path.parent.name for path in REPO.glob("models/*/server.py"))
HEAVY = ("torch", "transformers", "diffusers", "vllm", "sentence_transformers", "accelerate")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_every_service_is_found() -> None:
    assert {"echo", "embeddings", "flux", "musicgen", "vllm"} <= set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_imports_without_heavy_packages(service: str) -> None:
    modules = [f"models.{service}.{path.stem}" for path in sorted((REPO / "models" / service).glob("*.py"))]
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
            "assert not loaded, f'imported at module level: {loaded}'")
    done = run("-c", code)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_help_works_without_loading_a_model(service: str) -> None:
    done = run(f"models/{service}/server.py", "--help")
    assert done.returncode == 0, done.stderr
    assert "--port" in done.stdout and "--model" in done.stdout

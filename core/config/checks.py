"""Checks on a structurally valid models.yaml that span several models or touch the disk.

Each function returns a list of messages (empty when all is well), so ``load_config``
can report every problem at once instead of the first one only.
"""

from __future__ import annotations

import sys

from core.config.launch import resolve_python
from core.config.schema import OrchestratorConfig


def cross_model_problems(config: OrchestratorConfig) -> list[str]:
    problems: list[str] = []
    problems += _duplicate_names(config)
    problems += _duplicate_ports(config)
    problems += _command_choice(config)
    problems += _defaults(config)
    problems += _vram_within_budget(config)
    problems += _weights_placeholder(config)
    problems += _park_ways(config)
    problems += _gpu_choice(config)
    return problems


def _gpu_choice(config: OrchestratorConfig) -> list[str]:
    """The GPUs a model may use can hold its tensor-parallel span, and the placement alone names them."""
    problems = []
    for name, spec in config.models.items():
        if spec.gpus is not None and len(set(spec.gpus)) < spec.tensor_parallel:
            problems.append(f"model {name!r}: key 'gpus': {len(set(spec.gpus))} GPU(s) cannot hold "
                            f"tensor_parallel {spec.tensor_parallel}")
        if "CUDA_VISIBLE_DEVICES" in spec.env:
            problems.append(f"model {name!r}: key 'env': CUDA_VISIBLE_DEVICES is set by the orchestrator's "
                            "placement; pin the model with 'gpus: [...]' instead")
    return problems


def _park_ways(config: OrchestratorConfig) -> list[str]:
    """A command model parks only through declared calls: asking it to park on idle without them
    would silently never happen."""
    return [f"model {name!r}: key 'park.idle': a command model parks only through park.calls "
            "(e.g. `calls: vllm`); add them or remove park.idle"
            for name, spec in config.models.items()
            if spec.command is not None and spec.park.enabled and spec.park.idle > 0 and spec.park.calls is None]


def _weights_placeholder(config: OrchestratorConfig) -> list[str]:
    problems = []
    for name, spec in config.models.items():
        command = spec.command if isinstance(spec.command, list) else [spec.command or ""]
        if spec.weights is None and any("{weights}" in token for token in [*command, *spec.args]):
            problems.append(f"model {name!r}: key 'args': uses {{weights}} but the model has no 'weights' key")
    return problems


def _duplicate_names(config: OrchestratorConfig) -> list[str]:
    owner: dict[str, str] = {}
    problems = []
    for name, spec in config.models.items():
        for alias in spec.names():
            if alias in owner and owner[alias] != name:
                problems.append(
                    f"model {name!r}: key 'aliases': {alias!r} is already used by model {owner[alias]!r}"
                )
            elif alias in owner and alias != name:
                problems.append(f"model {name!r}: key 'aliases': {alias!r} is listed twice")
            owner.setdefault(alias, name)
    return problems


def _duplicate_ports(config: OrchestratorConfig) -> list[str]:
    owner: dict[int, str] = {}
    problems = []
    if any(spec.port == config.settings.port for spec in config.models.values()):
        owner[config.settings.port] = "settings (the orchestrator itself)"
    for name, spec in config.models.items():
        if spec.port in owner:
            problems.append(f"model {name!r}: key 'port': {spec.port} is already used by {owner[spec.port]}")
        else:
            owner[spec.port] = f"model {name!r}"
    return problems


def _command_choice(config: OrchestratorConfig) -> list[str]:
    problems = []
    for name, spec in config.models.items():
        has_script, has_command = spec.service_script is not None, spec.command is not None
        if has_script == has_command:
            which = "both" if has_script else "neither"
            problems.append(
                f"model {name!r}: keys 'service_script' / 'command': set exactly one ({which} is set)"
            )
        if has_command and spec.python is not None:
            problems.append(f"model {name!r}: key 'python' applies to service_script only; use {{python}} "
                            "in 'command' or give the interpreter's path there")
    return problems


def _defaults(config: OrchestratorConfig) -> list[str]:
    problems = []
    for kind, model in config.settings.defaults.items():
        spec = config.models.get(model)
        if spec is None:
            problems.append(f"settings: key 'defaults.{kind}': unknown model {model!r}")
        elif spec.type != kind:
            problems.append(
                f"settings: key 'defaults.{kind}': model {model!r} has type {spec.type!r}, not {kind!r}"
            )
    return problems


def _vram_within_budget(config: OrchestratorConfig) -> list[str]:
    budget = config.settings.gpu_memory_gb
    if budget == "auto":
        return []
    # "auto" is known only at run time (NVML); the scheduler refuses what does not fit then.
    overhead = config.settings.gpu_process_overhead_gb if config.settings.gpu_process_overhead_gb != "auto" else 0.0
    return [
        f"model {name!r}: key 'vram_gb': {spec.vram_gb} GB exceeds settings.gpu_memory_gb ({budget} GB)"
        + (f" with its process's {overhead:g} GB (settings.gpu_process_overhead_gb)" if spec.vram_gb <= budget else "")
        for name, spec in config.models.items()
        if spec.vram_gb is not None and spec.vram_gb > 0 and spec.vram_gb + overhead > budget
    ]


def file_problems(config: OrchestratorConfig) -> list[str]:
    problems = []
    for key in ("api_keys_file", "admin_keys_file"):
        value = getattr(config.settings, key)
        if value is not None and not config.resolve_path(value).is_file():
            problems.append(f"settings: key {key!r}: file not found: {config.resolve_path(value)}")
    for name, spec in config.models.items():
        if spec.service_script is not None:
            script = config.resolve_path(spec.service_script)
            if not script.is_file():
                problems.append(f"model {name!r}: key 'service_script': file not found: {script}")
            if resolve_python(spec.python, config.base_dir, sys.executable) is None:
                problems.append(f"model {name!r}: key 'python': no executable interpreter at {spec.python!r}")
    return problems

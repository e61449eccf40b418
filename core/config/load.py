"""Reading ``models.yaml``: parse (refusing duplicate keys), validate against the schema
(core/config/schema.py), then run the checks that need the whole file or the file system
(core/config/checks.py). ``load_config(path)`` is the one entry point the rest of the code uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core.config.checks import cross_model_problems, file_problems
from core.config.messages import describe
from core.config.schema import ConfigError, OrchestratorConfig


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *anchor`: merged keys may be overridden, not duplicates
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_config(path: str | os.PathLike[str]) -> OrchestratorConfig:
    """Read, validate and check a models.yaml; raise ConfigError naming what is wrong."""
    source = Path(path).resolve()
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, source)


def parse_config(text: str, source: Path) -> OrchestratorConfig:
    """``text`` validated as the models.yaml at ``source`` (a reload hashes the same bytes it applies)."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return config_from_dict(raw, source)


def config_from_dict(raw: Any, source: Path) -> OrchestratorConfig:
    """Validate already-parsed data as if it came from ``source``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'models' key, got {type(raw).__name__}")
    try:
        config = OrchestratorConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [describe(err, OrchestratorConfig) for err in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
    config._source = source
    base = config.settings.base_dir
    config._base_dir = (source.parent / base).resolve() if base else source.parent
    problems = check_config(config)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return config


def check_config(config: OrchestratorConfig) -> list[str]:
    """Cross-model and file-system checks; returns one message per problem."""
    return cross_model_problems(config) + file_problems(config)

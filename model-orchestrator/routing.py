"""Which model a request is for. Pure functions over the config; no I/O.

A request names its model in the JSON body's ``model`` field (a name or an alias).
When it names none, the endpoint decides (the original design's "determines model
from endpoint"): ``settings.defaults[<type>]``, else the one model whose ``endpoint``
is this path, else the only model of the endpoint's type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from core.config import ModelSpec, ModelType, OrchestratorConfig
from core.errors import ServiceError

# The OpenAI routes the orchestrator dispatches by model, and the model type each serves.
ENDPOINT_TYPES: Mapping[str, ModelType] = {
    "/v1/chat/completions": "text",
    "/v1/completions": "text",
    "/v1/embeddings": "embedding",
    "/v1/images/generations": "image",
    "/v1/audio/speech": "audio",
}


class ModelIndex:
    """Name and alias lookup, built once per config."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.by_name: dict[str, ModelSpec] = {}
        for spec in config.models.values():
            for name in spec.names():
                self.by_name[name] = spec

    def known(self) -> list[str]:
        return list(self.config.models)

    def lookup(self, name: str) -> ModelSpec:
        spec = self.by_name.get(name)
        if spec is None:
            raise ServiceError(
                404, f"The model {name!r} does not exist. Known models: {', '.join(self.known()) or 'none'}",
                "model_not_found", param="model",
            )
        return spec

    def default_for(self, path: str) -> ModelSpec:
        """The model serving ``path`` when a request names none."""
        kind = ENDPOINT_TYPES.get(path)
        defaults = self.config.settings.defaults
        if kind is not None and kind in defaults:
            return self.config.models[defaults[kind]]
        for candidates in (
            [s for s in self.config.models.values() if s.endpoint == path],
            [s for s in self.config.models.values() if kind is not None and s.type == kind],
        ):
            if len(candidates) == 1:
                return candidates[0]
        raise ServiceError(
            400, f"No model given and no default model for {path}: set 'model' to one of "
            f"{', '.join(self.known())} (or settings.defaults in models.yaml)", "model_required", param="model",
        )

    def resolve(self, model: str | None, path: str) -> ModelSpec:
        return self.default_for(path) if model is None else self.lookup(model)


def model_field(body: bytes) -> str | None:
    """The ``model`` of a JSON request body; None if absent. 400 if the body is not a JSON object."""
    return parse_model(body)[0]


def parse_model(body: bytes) -> tuple[str | None, dict[str, Any]]:
    """(the body's ``model`` or None, the parsed body). 400 if the body is not a JSON object."""
    if not body:
        return None, {}
    try:
        data = json.loads(body)
    except ValueError:
        raise ServiceError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(data, dict):
        raise ServiceError(400, "The request body must be a JSON object.", "invalid_json")
    model = data.get("model")
    if model is None:
        return None, data
    if not isinstance(model, str) or not model:
        raise ServiceError(400, "'model' must be a non-empty string.", "invalid_value", param="model")
    return model, data


def upstream_body(body: bytes, requested: str | None, data: dict[str, Any], spec: ModelSpec) -> bytes:
    """The body to send upstream: an alias is replaced by the model's own name.

    Upstreams serve a model under its models.yaml name (``--served-model-name {model}``) and,
    like vLLM's server, answer 404 to any other; the alias is the orchestrator's business.
    Requests that use the name itself (or none) pass through byte for byte.
    """
    if requested is None or requested == spec.name:
        return body
    return json.dumps({**data, "model": spec.name}, ensure_ascii=False, separators=(",", ":")).encode()


def split_upstream_path(path: str, index: ModelIndex) -> tuple[ModelSpec, str]:
    """``/upstream/<model>/<rest>`` → (spec, "/<rest>"). Model names may contain '/'."""
    parts = path.removeprefix("/upstream/").split("/")
    for cut in range(len(parts), 0, -1):  # longest name first: "Qwen/Qwen2.5-7B" before "Qwen"
        spec = index.by_name.get("/".join(parts[:cut]))
        if spec is not None:
            return spec, "/" + "/".join(parts[cut:])
    return index.lookup(parts[0]), "/"

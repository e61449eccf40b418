"""Which model a request is for. Pure functions over the config; no I/O.

A request names its model in the JSON body's ``model`` field (a name or an alias).
When it names none, the endpoint decides (the original design's "determines model
from endpoint"): ``settings.defaults[<type>]``, else the one model whose ``endpoint``
is this path, else the only model of the endpoint's type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from core.common.errors import ServiceError
from core.config.schema import Limits, ModelSpec, ModelType, OrchestratorConfig
from core.supervision.park_client import private_paths
from model_orchestrator.json_worker import BodyProblem, parse_object, requested_model, with_model
from model_orchestrator.multipart import FormProblem, form_fields, is_form

# The OpenAI routes the orchestrator dispatches by model, and the model type each serves.
ENDPOINT_TYPES: Mapping[str, ModelType] = {
    "/v1/chat/completions": "text",
    "/v1/completions": "text",
    "/v1/responses": "text",  # a stored response's GET and cancel name no model: stored_responses.py
    "/v1/messages": "text",  # Anthropic's Messages API
    "/v1/messages/count_tokens": "text",
    "/tokenize": "text",  # vLLM's own, outside /v1
    "/detokenize": "text",
    "/v1/embeddings": "embedding",
    "/v1/rerank": "rerank",  # and the same body at Jina's (vLLM's) and Cohere v2's paths:
    "/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/v1/images/generations": "image",
    "/v1/audio/speech": "audio",
    "/v1/audio/transcriptions": "transcription",  # multipart uploads: ``model`` is a form field (multipart.py)
    "/v1/audio/translations": "transcription",
}

# The model routes outside /v1 (client scope, dispatched by model like /v1's; model_orchestrator.auth).
ROOT_ROUTES = frozenset(route for route in ENDPOINT_TYPES if not route.startswith("/v1/"))

# Routes whose bodies are uploads (multipart files), allowed the larger upload_body_mb.
UPLOAD_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits",
                          "/v1/images/variations"})
_MIB = 1024 * 1024


class ModelIndex:
    """Name and alias lookup, built once per config."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.by_name: dict[str, ModelSpec] = {}
        for spec in config.models.values():
            for name in spec.names():
                self.by_name[name] = spec
        self.private = {name: private_paths(spec) for name, spec in config.models.items()}  # /upstream refuses
        # Routes that some model declares as its own (custom endpoints): only it, or a custom model, serves them.
        self.endpoints = declared_endpoints(config)

    def serves(self, spec: ModelSpec, path: str) -> bool:
        return serves(spec, path, self.endpoints)

    def renames(self) -> dict[str, str]:
        """Alias → model name, for every alias (what upstream_body rewrites)."""
        return {alias: spec.name for alias, spec in self.by_name.items() if alias != spec.name}

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
        if model is None:
            return self.default_for(path)
        spec = self.lookup(model)
        if not self.serves(spec, path):  # refused before a cold start that could only end in a 404
            raise ServiceError(404, not_served_message(spec, model, path), "route_not_served", param="model")
        return spec


def declared_endpoints(config: OrchestratorConfig) -> frozenset[str]:
    """The routes models declare as their own (``endpoint``): only they, or a custom model, serve them."""
    return frozenset(s.endpoint for s in config.models.values() if s.endpoint is not None)


def serves(spec: ModelSpec, path: str, endpoints: frozenset[str] = frozenset()) -> bool:
    """Whether ``spec`` may serve a route: an OpenAI route of its type's (a ``custom`` model, any),
    or its own ``endpoint``. Another model's ``endpoint`` (one of ``endpoints``) is that model's
    alone; any other route is the service's to answer."""
    route = path.rstrip("/") or "/"  # "/v1/ner/" is the same route to a service
    if spec.type == "custom" or spec.endpoint == route:
        return True
    kind = ENDPOINT_TYPES.get(route)
    return spec.type == kind if kind is not None else route not in endpoints


def not_served_message(spec: ModelSpec, requested: str, path: str) -> str:
    named = repr(requested) if requested == spec.name else f"{requested!r} (an alias of {spec.name!r})"
    routes = [spec.endpoint] if spec.endpoint else [route for route, kind in ENDPOINT_TYPES.items()
                                                    if kind == spec.type]
    serving = (f"its endpoint is {routes[0]}" if len(routes) == 1 else f"its endpoints are {', '.join(routes)}"
               if routes else "it has no OpenAI route")
    article = "an" if spec.type[0] in "aeiou" else "a"
    return f"The model {named} is {article} {spec.type} model and does not serve {path}: {serving}."


def body_limit(path: str, headers: Iterable[tuple[bytes, bytes]], limits: Limits) -> int:
    """The largest body (bytes) a request may send: upload_body_mb for uploads and /upstream,
    json_body_mb for the JSON routes."""
    if path.startswith("/upstream/") or path in UPLOAD_PATHS:
        return int(limits.upload_body_mb * _MIB)
    if any(name == b"content-type" and is_form(value) for name, value in headers):
        return int(limits.upload_body_mb * _MIB)
    return int(limits.json_body_mb * _MIB)


def model_field(body: bytes) -> str | None:
    """The ``model`` of a JSON request body; None if absent. 400 if the body is not a JSON object."""
    return parse_model(body)[0]


def parse_model(body: bytes, max_depth: int = 64) -> tuple[str | None, dict[str, Any]]:
    """(the body's ``model`` or None, the parsed body). 400 if the body is not a JSON object
    or nests deeper than ``max_depth``. On the event loop: for small bodies only (see json_worker)."""
    if not body:
        return None, {}
    try:
        data = parse_object(body, max_depth)
        return requested_model(data), data
    except BodyProblem as exc:
        raise problem_error(exc) from None


def parse_form_model(body: bytes, content_type: bytes) -> tuple[str | None, bool]:
    """(the form's ``model`` or None, whether it asks for a stream) of a multipart/form-data body; 400 if
    the body is not the form its Content-Type says (multipart.py)."""
    try:
        fields = form_fields(body, content_type)
    except FormProblem as exc:
        raise ServiceError(400, f"Could not parse the multipart/form-data body: {exc}.", "invalid_multipart") \
            from None
    return fields.get("model") or None, fields.get("stream", "").lower() == "true"


def problem_error(problem: BodyProblem) -> ServiceError:
    retry_after = 1 if problem.status == 503 else None
    return ServiceError(problem.status, problem.message, problem.code, param=problem.param, retry_after=retry_after)


def upstream_body(body: bytes, requested: str | None, data: dict[str, Any], spec: ModelSpec) -> bytes:
    """The body to send upstream: an alias is replaced by the model's own name.

    Upstreams serve a model under its models.yaml name (``--served-model-name {model}``) and,
    like vLLM's server, answer 404 to any other; the alias is the orchestrator's business.
    Requests that use the name itself (or none) pass through byte for byte.
    """
    if requested is None or requested == spec.name:
        return body
    return with_model(data, spec.name)


def split_upstream_path(path: str, index: ModelIndex) -> tuple[ModelSpec, str]:
    """``/upstream/<model>/<rest>`` → (spec, "/<rest>"). Model names may contain '/'.

    403 for the model's park machinery (its /offload, vLLM's development routes): only the
    orchestrator itself calls those, never a client, not even an admin.
    """
    spec, rest = _split(path.removeprefix("/upstream/").split("/"), index)
    # ``path`` is canonical (paths.py: no dot or empty segments, no encoded separators), so only a
    # trailing "/" can spell a private route another way.
    if (rest.rstrip("/") or "/") in index.private[spec.name]:
        raise ServiceError(403, f"{rest} of model {spec.name!r} is the orchestrator's own (parking); "
                           "it is not reachable through /upstream", "private_route")
    return spec, rest


def _split(parts: list[str], index: ModelIndex) -> tuple[ModelSpec, str]:
    for cut in range(len(parts), 0, -1):  # longest name first: "Qwen/Qwen2.5-7B" before "Qwen"
        spec = index.by_name.get("/".join(parts[:cut]))
        if spec is not None:
            return spec, "/" + "/".join(parts[cut:])
    return index.lookup(parts[0]), "/"

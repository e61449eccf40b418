"""ModelIndex.resolve, model_field, split_upstream_path and body_limit over configs built in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.common.errors import ServiceError
from core.config.load import config_from_dict
from core.config.schema import Limits
from model_orchestrator.routing import (
    ModelIndex,
    body_limit,
    model_field,
    parse_model,
    serves,
    split_upstream_path,
    upstream_body,
)

SOURCE = Path("models.yaml")  # never read: these configs come from dicts


def model(kind: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "command": "serve --port {port}", "port": port, **extra}


def index(models: dict[str, dict[str, Any]], **settings: Any) -> ModelIndex:
    raw: dict[str, Any] = {"models": models}
    if settings:
        raw["settings"] = settings
    return ModelIndex(config_from_dict(raw, SOURCE))


def two_text_models(**settings: Any) -> ModelIndex:
    return index(
        {
            "qwen": model("text", 8001, aliases=["gpt-4o", "q"]),
            "llama": model("text", 8002),
            "bge": model("embedding", 8003),
            "sd": model("image", 8004, endpoint="/v1/images/generations"),
        },
        **settings,
    )


def service_error(call: Any, *args: Any) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        call(*args)
    return info.value


# --- resolve --------------------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "path", "expected"), [
    ("qwen", "/v1/chat/completions", "qwen"), ("gpt-4o", "/v1/completions", "qwen"),
    ("q", "/v1/chat/completions", "qwen"), ("bge", "/v1/embeddings", "bge")])
def test_resolve_by_name_or_alias(asked: str, path: str, expected: str) -> None:
    assert two_text_models().resolve(asked, path).name == expected


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/tokenize",
                                  "/detokenize"])
def test_the_responses_messages_and_tokenize_routes_default_to_the_text_model(path: str) -> None:
    assert two_text_models(defaults={"text": "llama"}).resolve(None, path).name == "llama"
    assert two_text_models().resolve("q", path).name == "qwen"


def test_named_model_wins_over_the_default() -> None:
    assert two_text_models(defaults={"text": "qwen"}).resolve("llama", "/v1/chat/completions").name == "llama"


@pytest.mark.parametrize(("asked", "path", "expected"), [
    ("bge", "/v1/chat/completions",
     "The model 'bge' is an embedding model and does not serve /v1/chat/completions: its endpoint is /v1/embeddings."),
    ("gpt-4o", "/v1/images/generations", "The model 'gpt-4o' (an alias of 'qwen') is a text model and does not "
     "serve /v1/images/generations: its endpoints are /v1/chat/completions, /v1/completions, /v1/responses, "
     "/v1/messages, /v1/messages/count_tokens, /tokenize, /detokenize."),
    ("bge", "/v1/messages", "The model 'bge' is an embedding model and does not serve /v1/messages: its endpoint is "
     "/v1/embeddings."),
    ("sd", "/tokenize", "The model 'sd' is an image model and does not serve /tokenize: its endpoint is "
     "/v1/images/generations."),
    ("sd", "/v1/embeddings",
     "The model 'sd' is an image model and does not serve /v1/embeddings: its endpoint is /v1/images/generations."),
])
def test_a_model_asked_for_a_route_of_another_type_is_404_naming_its_endpoint(asked: str, path: str,
                                                                              expected: str) -> None:
    err = service_error(two_text_models().resolve, asked, path)
    assert (err.status, err.code, err.param, err.message) == (404, "route_not_served", "model", expected)


@pytest.mark.parametrize(("spec", "path", "served"), [
    (model("custom", 1), "/v1/chat/completions", True),   # a custom service answers for itself
    (model("text", 1), "/v1/classify", True),             # not an OpenAI route the orchestrator knows
    (model("text", 1, endpoint="/v1/embeddings"), "/v1/embeddings", True),  # its declared endpoint
    (model("audio", 1), "/v1/audio/speech", True),
    (model("audio", 1), "/v1/completions", False),
])
def test_serves(spec: dict[str, Any], path: str, served: bool) -> None:
    assert serves(index({"m": spec}).by_name["m"], path) is served


def test_another_models_custom_endpoint_is_not_served_before_anything_starts() -> None:
    # #19: POST /v1/ner {"model": "echo"} started echo (parking ner to make room) only to get its 404.
    idx = index({"ner": model("text", 1, endpoint="/v1/ner"), "echo": model("text", 2),
                 "any": model("custom", 3)})
    assert idx.resolve("ner", "/v1/ner").name == "ner"
    assert idx.resolve(None, "/v1/ner").name == "ner"
    assert idx.resolve("any", "/v1/ner").name == "any"  # a custom service answers for itself
    assert idx.resolve("echo", "/v1/classify").name == "echo"  # nobody's endpoint: the service's to answer
    for path in ("/v1/ner", "/v1/ner/"):  # a trailing "/" is the same route to a service
        err = service_error(idx.resolve, "echo", path)
        assert (err.status, err.code, err.param) == (404, "route_not_served", "model")
        assert f"does not serve {path}" in err.message
    assert service_error(idx.resolve, "echo", "/v1/embeddings/").code == "route_not_served"


def test_unknown_model_is_404_listing_known_models() -> None:
    err = service_error(two_text_models().resolve, "gpt-5", "/v1/chat/completions")
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "'gpt-5'" in err.message
    assert "Known models: qwen, llama, bge, sd" in err.message


def test_settings_default_wins() -> None:
    idx = two_text_models(defaults={"text": "llama", "embedding": "bge"})
    assert idx.resolve(None, "/v1/chat/completions").name == "llama"
    assert idx.resolve(None, "/v1/completions").name == "llama"
    assert idx.resolve(None, "/v1/embeddings").name == "bge"


def test_default_wins_over_endpoint_match() -> None:
    idx = index(
        {"a": model("text", 8001, endpoint="/v1/chat/completions"), "b": model("text", 8002)},
        defaults={"text": "b"},
    )
    assert idx.resolve(None, "/v1/chat/completions").name == "b"


def test_unique_endpoint_match_without_default() -> None:
    idx = index({"a": model("text", 8001), "b": model("text", 8002, endpoint="/v1/chat/completions")})
    assert idx.resolve(None, "/v1/chat/completions").name == "b"


def test_endpoint_match_on_unlisted_path() -> None:
    idx = index({"a": model("custom", 8001, endpoint="/v1/rerank"), "b": model("custom", 8002)})
    assert idx.resolve(None, "/v1/rerank").name == "a"


def test_unique_model_of_endpoint_type() -> None:
    idx = two_text_models()
    assert idx.resolve(None, "/v1/embeddings").name == "bge"
    assert idx.resolve(None, "/v1/images/generations").name == "sd"


def test_two_endpoint_matches_fall_back_to_unique_type() -> None:
    idx = index({
        "a": model("text", 8001, endpoint="/v1/embeddings"),
        "b": model("text", 8002, endpoint="/v1/embeddings"),
        "e": model("embedding", 8003),
    })
    assert idx.resolve(None, "/v1/embeddings").name == "e"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/speech", "/v1/unknown"])
def test_no_model_and_no_unique_choice_is_400(path: str) -> None:
    err = service_error(two_text_models().resolve, None, path)
    assert (err.status, err.code, err.param) == (400, "model_required", "model")
    assert path in err.message
    assert "qwen, llama, bge, sd" in err.message


# --- model_field ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model": "qwen", "messages": []}', "qwen"),
        (b'{"model": "Qwen/Qwen2.5-7B"}', "Qwen/Qwen2.5-7B"),
        (b'{"messages": []}', None),
        (b'{"model": null}', None),
        (b"", None),
    ],
)
def test_model_field(body: bytes, expected: str | None) -> None:
    assert model_field(body) == expected


@pytest.mark.parametrize("body", [b"not json", b'{"model": ', b"\xff\xfe", b"[1, 2]", b'"qwen"', b"null", b"3"])
def test_model_field_rejects_non_object_bodies(body: bytes) -> None:
    err = service_error(model_field, body)
    assert (err.status, err.code) == (400, "invalid_json")


@pytest.mark.parametrize("body", [b'{"model": 3}', b'{"model": ["a"]}', b'{"model": {}}', b'{"model": ""}'])
def test_model_field_rejects_non_string_model(body: bytes) -> None:
    err = service_error(model_field, body)
    assert (err.status, err.code, err.param) == (400, "invalid_value", "model")


# --- upstream_body: aliases become the model's own name -------------------------------------


def test_an_alias_is_replaced_by_the_model_name_and_everything_else_is_kept() -> None:
    idx = ModelIndex(config_from_dict({"models": {"qwen": model("text", 8001, aliases=["gpt-4o-mini"])}}, SOURCE))
    sent_by_client = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hé"}], "stream": True}
    body = json.dumps(sent_by_client).encode()
    requested, data = parse_model(body)
    spec = idx.resolve(requested, "/v1/chat/completions")
    sent = json.loads(upstream_body(body, requested, data, spec))
    assert sent == {"model": "qwen", "messages": [{"role": "user", "content": "hé"}], "stream": True}


@pytest.mark.parametrize("body", [b'{"model": "qwen", "x": [1,  2]}', b'{"messages": []}', b""])
def test_the_model_name_itself_or_none_passes_byte_for_byte(body: bytes) -> None:
    idx = ModelIndex(config_from_dict({"models": {"qwen": model("text", 8001, aliases=["q"])}}, SOURCE))
    requested, data = parse_model(body)
    spec = idx.resolve(requested, "/v1/chat/completions")
    assert upstream_body(body, requested, data, spec) is body


# --- split_upstream_path --------------------------------------------------------------------


def slash_index() -> ModelIndex:
    return index({
        "Qwen": model("text", 8001),
        "Qwen/Qwen2.5-7B": model("text", 8002, aliases=["org/team/q7"]),
        "bge": model("embedding", 8003),
    })


@pytest.mark.parametrize(
    ("path", "name", "rest"),
    [
        ("/upstream/bge/v1/embeddings", "bge", "/v1/embeddings"),
        ("/upstream/Qwen/Qwen2.5-7B/v1/chat/completions", "Qwen/Qwen2.5-7B", "/v1/chat/completions"),
        ("/upstream/Qwen/v1/models", "Qwen", "/v1/models"),
        ("/upstream/Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B", "/"),
        ("/upstream/org/team/q7/health", "Qwen/Qwen2.5-7B", "/health"),
        ("/upstream/bge", "bge", "/"),
        ("/upstream/bge/", "bge", "/"),
    ],
)
def test_split_upstream_path(path: str, name: str, rest: str) -> None:
    spec, remainder = split_upstream_path(path, slash_index())
    assert (spec.name, remainder) == (name, rest)


@pytest.mark.parametrize("path", ["/upstream/nope/v1/models", "/upstream/", "/upstream/qwen/x"])
def test_split_upstream_unknown_model_is_404(path: str) -> None:
    err = service_error(split_upstream_path, path, slash_index())
    assert (err.status, err.code) == (404, "model_not_found")
    assert "Known models: Qwen, Qwen/Qwen2.5-7B, bge" in err.message


# --- body limits per route, nesting, renames ----------------------------------------------------

LIMITS = Limits(json_body_mb=1, upload_body_mb=4)
JSON_TYPE = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(
    ("path", "headers", "mib"),
    [
        ("/v1/chat/completions", JSON_TYPE, 1),
        ("/v1/embeddings", [], 1),
        ("/v1/audio/transcriptions", [], 4),
        ("/v1/audio/translations", JSON_TYPE, 4),
        ("/v1/images/edits", [], 4),
        ("/v1/images/variations", [], 4),
        ("/v1/anything", [(b"content-type", b"Multipart/Form-Data; boundary=x")], 4),
        ("/upstream/qwen/v1/chat/completions", JSON_TYPE, 4),
    ],
)
def test_body_limit_per_route(path: str, headers: list[tuple[bytes, bytes]], mib: int) -> None:
    assert body_limit(path, headers, LIMITS) == mib * 1024 * 1024


def test_parse_model_bounds_nesting() -> None:
    err = service_error(parse_model, b'{"model": "q", "x": ' + b"[" * 10 + b"]" * 10 + b"}", 8)
    assert (err.status, err.code) == (400, "json_too_deep")
    assert parse_model(b'{"model": "q", "x": [[1]]}', 8)[0] == "q"


def test_renames_lists_every_alias_and_no_name() -> None:
    assert two_text_models().renames() == {"gpt-4o": "qwen", "q": "qwen"}

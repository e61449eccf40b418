"""The gateway's config (model_orchestrator/gateway/render.py) and who may use it (gateway/auth.py): pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from model_orchestrator.gateway.auth import CLIENT_ROUTES, client_keys, refusal, scope_of
from model_orchestrator.gateway.render import AUTH, PLUGIN, GatewayConfig, load, main

PODS_YAML = """
models:
  qwen2.5-7b-instruct: {type: text, port: 8001, aliases: [qwen]}
  flux.1-schnell: {type: image, port: 8002}
"""


def fleet(tmp_path: Path, **settings: object) -> Path:
    (tmp_path / "models.yaml").write_text(PODS_YAML)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "pods": [{"id": "pod-a", "url": "http://pod-a:9000", "models_config": "models.yaml", "key_env": "A_KEY",
                  "state_key_env": "A_STATE"},
                 {"id": "pod-b", "url": "http://pod-b:9000/", "models": ["qwen2.5-7b-instruct"]}],
        "settings": settings}))
    return path


def test_one_deployment_per_pod_and_name_with_keys_left_in_the_environment(tmp_path: Path) -> None:
    assert main([str(fleet(tmp_path, timeout_s=1200)), "--out", str(tmp_path / "out")]) == 0
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    ids = sorted(d["model_info"]["id"] for d in config["model_list"])
    assert ids == ["pod-a/flux.1-schnell", "pod-a/qwen", "pod-a/qwen2.5-7b-instruct", "pod-b/qwen2.5-7b-instruct"]
    alias = next(d for d in config["model_list"] if d["model_info"]["id"] == "pod-a/qwen")
    assert alias["litellm_params"] == {"model": "openai/qwen", "api_base": "http://pod-a:9000/v1",
                                       "api_key": "os.environ/A_KEY", "timeout": 1200, "stream_timeout": 1200}
    assert alias["model_info"]["aio_model"] == "qwen2.5-7b-instruct"  # the plug-in ranks by the pods' name
    general = config["general_settings"]
    assert general == {"master_key": "os.environ/LITELLM_MASTER_KEY", "custom_auth": AUTH,
                       "background_health_checks": False}
    assert config["litellm_settings"]["callbacks"] == [PLUGIN, "prometheus"]
    assert config["router_settings"]["retry_policy"]["TimeoutErrorRetries"] == 0  # a slow cold load: no 2nd load
    pods = json.loads((tmp_path / "out" / "fleet.json").read_text())["pods"]
    assert pods == [{"pod": "pod-a", "state_url": "http://pod-a:9000/fleet/state", "key_env": "A_STATE"},
                    {"pod": "pod-b", "state_url": "http://pod-b:9000/fleet/state", "key_env": None}]


@pytest.mark.parametrize(("change", "named"), [
    ({"pods": [{"id": "a", "url": "http://a:9000", "models": ["m"], "typo": 1}]}, "pods.0.typo"),
    ({"pods": [{"id": "a", "url": "a:9000", "models": ["m"]}]}, "pods.0.url"),
    ({"pods": [{"id": "a", "url": "http://a:9000"}]}, "exactly one of `models` and `models_config`"),
    ({"pods": [{"id": "a", "url": "http://a", "models": []}, {"id": "a", "url": "http://b", "models": []}]},
     "unique"),
    ({"pods": []}, "pods"),
    ({"pods": [{"id": "a", "url": "http://a", "models": []}], "settings": {"timeout_s": 0}}, "settings.timeout_s"),
])
def test_a_bad_fleet_file_names_the_key(tmp_path: Path, change: dict[str, object], named: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(change))
    with pytest.raises(SystemExit, match=named.replace(".", r"\.").replace("`", ".")):
        load(path)


def test_the_defaults_are_a_gateway_that_waits_out_a_cold_load() -> None:
    settings = GatewayConfig.model_validate({"pods": [{"id": "a", "url": "http://a", "models": []}]}).settings
    assert settings.timeout_s >= 600 and settings.poll_interval_s == 1.0 and settings.num_retries >= 1


def test_client_keys_reach_the_openai_routes_and_the_master_key_everything() -> None:
    keys = client_keys({"AIO_GATEWAY_KEYS": " c1 ,c2,, "})
    assert keys == ["c1", "c2"]
    assert scope_of("c2", "master", keys) == "client" and scope_of("master", "master", keys) == "admin"
    assert scope_of("", "master", keys) is None and scope_of("c3", "master", keys) is None
    assert scope_of("", "", []) is None  # no master key set: nobody, not everybody
    assert refusal("client", "/v1/chat/completions") is None and refusal("admin", "/key/generate") is None
    assert "/v1/embeddings" in CLIENT_ROUTES and "/metrics" not in CLIENT_ROUTES
    for path in ("/key/generate", "/model/new", "/metrics/", "/v1/../key/generate", "/v1/chat/completions/"):
        assert refusal("client", path) is not None and refusal("client", path)[0] == 403  # type: ignore[index]
    assert refusal(None, "/v1/chat/completions")[0] == 401  # type: ignore[index]


def test_rendering_again_rewrites_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = fleet(tmp_path)
    main([str(path), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.count("wrote ") == 2
    main([str(path), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.count("unchanged ") == 2

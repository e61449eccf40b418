"""The data plane's policy and nginx configuration, as pure functions (model-orchestrator/dataplane)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from core.common.contract import service_socket
from core.config.load import config_from_dict
from core.config.schema import OrchestratorConfig
from model_orchestrator.dataplane.conf import Paths, nginx_conf, quoted, table_json
from model_orchestrator.dataplane.policy import FAST_ROUTES, may_take_fast_path, route_table, upstreams


def config(**models: dict[str, Any]) -> OrchestratorConfig:
    return config_from_dict({"settings": {"port": 9000}, "models": {
        name: {"command": "serve", "port": 8000 + number, **spec} for number, (name, spec) in enumerate(models.items())
    }}, Path("models.yaml"))


@pytest.mark.parametrize(("spec", "fast"), [
    ({"pinned": True}, True),
    ({}, False),  # may be evicted: its requests must hold leases
    ({"pinned": True, "ttl": 60}, False),  # an idle timer stops it: the orchestrator must see its use
    ({"pinned": True, "park": {"idle": 30, "calls": "vllm"}}, False),
])
def test_only_a_model_that_stays_ready_may_take_the_fast_path(spec: dict[str, Any], fast: bool) -> None:
    assert may_take_fast_path(config(m={"type": "text", **spec}).models["m"]) is fast


def test_the_table_routes_ready_fast_models_by_name_on_the_routes_their_type_serves() -> None:
    cfg = config(chat={"type": "text", "pinned": True, "aliases": ["gpt-4o-mini"]},
                 vectors={"type": "embedding", "pinned": True}, cold={"type": "text"},
                 asleep={"type": "image", "pinned": True})
    table = route_table(cfg, ["chat", "vectors", "cold"], None, 7)
    routes: Any = table["routes"]
    assert routes["/v1/chat/completions"] == {"chat": "@m0"}  # no alias (the body would need rewriting)
    assert routes["/v1/embeddings"] == {"vectors": "@m1"}
    assert "/v1/images/generations" not in routes  # asleep is not ready
    assert not any(route.startswith("/v1/responses") or "audio/transcriptions" in route for route in FAST_ROUTES)
    assert table["keys"] is None and table["generation"] == 7


def test_the_table_holds_digests_of_the_keys_never_the_keys() -> None:
    digest = hashlib.sha256(b"a-client-key").digest()
    text = table_json(route_table(config(m={"type": "text", "pinned": True}), ["m"], [digest], 1),
                      upstreams(config(m={"type": "text", "pinned": True})))
    assert "a-client-key" not in text and json.loads(text)["keys"] == {digest.hex(): 1}
    failed = json.loads(json.loads(text)["failed"]["@m0"])
    assert failed["error"]["code"] == "upstream_error" and "'m'" in failed["error"]["message"]


def test_the_configuration_bounds_each_model_as_the_orchestrator_does(tmp_path: Path) -> None:
    cfg = config(m={"type": "text", "pinned": True, "max_concurrency": 4, "request_timeout": 90,
                    "host": "::1"})
    text = nginx_conf(cfg.settings, upstreams(cfg), Paths(tmp_path), "s3cret'x", "/mods/njs.so", "root")
    assert text.startswith("load_module '/mods/njs.so';\nuser root;\n")
    assert "upstream m0 { server '[::1]:8000' max_conns=4 max_fails=0; keepalive 32; }" in text
    assert "proxy_read_timeout 90000ms;" in text and "listen 127.0.0.1:9000;" in text
    assert r"proxy_set_header Authorization 'Bearer s3cret\'x';" in text  # the service token, quoted
    for name in ("X-Api-Key", "Cookie", "Proxy-Authorization", "Upgrade", "TE"):  # credentials, hop-by-hop
        assert f"proxy_set_header {name} '';" in text
    assert f"listen 'unix:{tmp_path / 'control.sock'}';" in text and f"'unix:{tmp_path / 'orchestrator.sock'}'" in text


def test_a_service_that_listens_on_a_unix_socket_is_reached_there(tmp_path: Path) -> None:
    cfg = config(m={"type": "text", "pinned": True}, n={"type": "text", "pinned": True})
    socket = service_socket(tmp_path, "m")
    assert socket is not None and socket.parent == tmp_path and socket.name.endswith(".sock")
    ups = upstreams(cfg, {"m": str(socket)})
    assert [up.server for up in ups] == [f"unix:{socket}", "127.0.0.1:8001"]  # n listens on its port only
    text = nginx_conf(cfg.settings, ups, Paths(tmp_path), None, None)
    assert f"upstream m0 {{ server 'unix:{socket}' max_conns" in text
    assert "proxy_set_header Host 127.0.0.1:8000;" in text  # the Host header still names its address


def test_a_socket_path_too_long_for_the_kernel_is_not_offered() -> None:
    assert service_socket(Path("/" + "d" * 60), "any model/name with spaces") is not None
    assert service_socket(Path("/" + "d" * 90), "m") is None  # sun_path holds 107 bytes: the port then


def test_quoting_keeps_an_nginx_argument_whole() -> None:
    assert quoted("it's a \\ path") == "'it\\'s a \\\\ path'"

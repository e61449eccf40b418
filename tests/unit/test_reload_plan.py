"""What a reload changes (model_orchestrator/reload_plan.py), over configs built in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config.load import config_from_dict
from core.config.schema import OrchestratorConfig
from model_orchestrator.reload_plan import config_hash, plan_reload

SOURCE = Path("/pod/models.yaml")  # never read


def config(models: dict[str, dict[str, Any]], **settings: Any) -> OrchestratorConfig:
    return config_from_dict({"settings": settings, "models": models}, SOURCE)


def model(port: int, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "command": "serve --port {port}", "port": port, **extra}


BEFORE = {"a": model(8001, aliases=["x"]), "b": model(8002, args=["--fast"]), "d": model(8004),
          "p": model(8005, ttl=60)}


def test_each_model_is_added_removed_restarted_changed_live_or_untouched() -> None:
    after = {"a": model(8001, aliases=["x", "y"], ttl=30), "b": model(8002, args=["--slow"], max_concurrency=2),
             "c": model(8003), "p": model(8005, ttl=60)}
    plan = plan_reload(config(BEFORE), config(after))
    assert (plan.added, plan.removed, plan.unchanged) == (("c",), ("d",), ("p",))
    assert plan.restarted == {"b": ("args",)}  # a process field wins: max_concurrency comes with the restart
    assert plan.live == {"a": ("aliases", "ttl")}
    assert plan.changes_anything and not plan.refused and plan.settings_live == ()


def test_every_process_field_restarts() -> None:
    for changed in ({"port": 9100}, {"env": {"A": "1"}}, {"vram_gb": 4}, {"gpus": [1]},
                    {"command": "serve --other --port {port}"}, {"tensor_parallel": 2}, {"peer_to_peer": False}):
        plan = plan_reload(config({"a": model(8001)}), config({"a": model(8001) | changed}))
        assert plan.restarted == {"a": tuple(changed)}, changed


def test_settings_apply_live_or_are_refused_with_why() -> None:
    before = config(BEFORE, port=9000, max_queue=64, limits={"json_body_mb": 16})
    after = config(BEFORE, port=9100, max_queue=8, defaults={"text": "a"}, api_key_env="KEYS",
                   limits={"json_body_mb": 4, "max_connections": 10})
    plan = plan_reload(before, after)
    assert plan.settings_live == ("defaults", "max_queue", "api_key_env", "limits.json_body_mb")
    assert set(plan.refused) == {"port", "limits.max_connections"}
    assert "restart of the orchestrator" in plan.refused["port"] and plan.summary()["refused"] == plan.refused


def test_the_same_file_changes_nothing() -> None:
    plan = plan_reload(config(BEFORE), config(BEFORE))
    assert not plan.changes_anything and plan.unchanged == ("a", "b", "d", "p") and not plan.refused


def test_the_hash_is_short_and_follows_the_bytes() -> None:
    assert config_hash(b"a") != config_hash(b"b") and len(config_hash(b"a")) == 12

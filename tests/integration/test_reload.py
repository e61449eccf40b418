"""Reloading models.yaml on a running orchestrator (model_orchestrator/reload.py), through a real process.

One reload adds, changes and removes models while a stream runs: what did not change keeps its process,
state and queue; what changed restarts on its next request; what was removed answers 404. An invalid file
changes nothing; a rotated key applies at once; SIGHUP does what POST /admin/reload does.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Orchestrator, fake_model, wait_until

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer reload-admin"}
KEYS = {"AIO_ADMIN_KEYS": "reload-admin"}


def rewrite(orch: Orchestrator, change: Any) -> dict[str, Any]:
    """Edit the orchestrator's models.yaml in place with ``change(config)``."""
    config = yaml.safe_load(orch.config.read_text())
    change(config)
    orch.config.write_text(yaml.safe_dump(config))
    return dict(config)


def reload(orch: Orchestrator) -> httpx.Response:
    return httpx.post(orch.url + "/admin/reload", headers=ADMIN, timeout=60)


def chat(orch: Orchestrator, model: str, key: str = "reload-admin", content: str = "hello there",
         **body: Any) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(orch.url + "/v1/chat/completions", json=payload, timeout=60,
                      headers={"Authorization": f"Bearer {key}"})


def status(orch: Orchestrator) -> dict[str, Any]:
    return dict(httpx.get(orch.url + "/status", headers=ADMIN, timeout=10).json())


def pids(orch: Orchestrator) -> dict[str, tuple[str, int | None]]:
    return {name: (model["state"], model["pid"]) for name, model in status(orch)["models"].items()}


def test_one_reload_adds_changes_and_removes_while_a_stream_runs(orchestrator: Any) -> None:
    models = {"a": fake_model("a", "--stream-chunks", "30", "--token-delay", "0.1", vram_gb=1),
              "b": fake_model("b", vram_gb=1), "d": fake_model("d", "--start-delay", "30", vram_gb=1),
              "p": fake_model("p", vram_gb=1)}
    orch = orchestrator(models, env=KEYS, gpu_memory_gb=10, host_memory_gb=10)
    for name in ("b", "p"):
        assert chat(orch, name).status_code == 200
    assert httpx.post(orch.url + "/admin/models/p/park", headers=ADMIN, timeout=60).json()["state"] == "parked"
    streamed: list[str] = []
    stream = threading.Thread(target=lambda: streamed.extend(_stream(orch, "a")))
    stream.start()
    assert wait_until(lambda: pids(orch)["a"][0] == "ready" and status(orch)["models"]["a"]["in_flight"] == 1, 20)
    before = pids(orch)  # a streaming, b ready, p parked, d stopped
    waiting_for_d: list[httpx.Response] = []
    queued = threading.Thread(target=lambda: waiting_for_d.append(chat(orch, "d")))
    queued.start()
    assert wait_until(lambda: status(orch)["models"]["d"]["waiting"] == 1, 10)

    def change(config: dict[str, Any]) -> None:
        config["models"]["a"]["aliases"] = ["a-alias"]
        config["models"]["b"]["args"] += ["--stream-chunks", "3"]
        config["models"]["c"] = fake_model("c", vram_gb=1)
        del config["models"]["d"]
    rewrite(orch, change)
    answer = reload(orch).json()
    assert (answer["added"], answer["removed"], answer["restarted"], answer["changed_live"]) == (
        ["c"], ["d"], {"b": ["args"]}, {"a": ["aliases"]}), answer
    assert answer["unchanged"] == ["p"] and answer["refused"] == {} and answer["applied"]

    queued.join(30)
    assert waiting_for_d and waiting_for_d[0].status_code == 404, waiting_for_d
    assert waiting_for_d[0].json()["error"]["code"] == "model_not_found"
    stream.join(30)
    assert len(streamed) == 30 and "".join(streamed) == " ".join(f"tok{i}" for i in range(30)), streamed  # all
    after = pids(orch)
    assert after["a"] == before["a"] and after["p"] == before["p"] == ("parked", before["p"][1])
    assert "d" not in after and after["c"] == ("stopped", None)
    assert chat(orch, "a-alias").json()["model"] == "a"  # the new alias
    reply = chat(orch, "b").json()  # b restarts with its new args: three fixed words
    assert reply["choices"][0]["message"]["content"] == "tok0 tok1 tok2" and pids(orch)["b"][1] != before["b"][1]
    assert chat(orch, "c").status_code == 200
    assert chat(orch, "d").json()["error"]["code"] == "model_not_found"


def _stream(orch: Orchestrator, model: str) -> list[str]:
    import json

    pieces = []
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.stream("POST", orch.url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
    return pieces


@pytest.mark.parametrize("broken", ["bad yaml", "unknown key", "port clash"])
def test_an_invalid_file_is_refused_with_why_and_changes_nothing(orchestrator: Any, broken: str) -> None:
    orch = orchestrator({"a": fake_model("a"), "b": fake_model("b")}, env=KEYS)
    assert chat(orch, "a").status_code == 200
    before, hash_before = pids(orch), status(orch)["config"]["hash"]
    if broken == "bad yaml":
        orch.config.write_text(orch.config.read_text() + "\n  - : [unclosed\n")
    elif broken == "unknown key":
        rewrite(orch, lambda config: config["models"]["a"].update(tll=30))
    else:
        rewrite(orch, lambda config: config["models"]["b"].update(port=config["models"]["a"]["port"]))
    refused = reload(orch)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    says = {"bad yaml": "not valid YAML", "unknown key": "did you mean 'ttl'", "port clash": "port"}[broken]
    assert error["code"] == "invalid_config" and str(orch.config) in error["message"] and says in error["message"]
    assert pids(orch) == before and status(orch)["config"]["hash"] == hash_before
    assert chat(orch, "a").status_code == 200 and chat(orch, "b").status_code == 200


def test_a_rotated_key_applies_at_once_without_a_restart(orchestrator: Any, tmp_path: Path) -> None:
    keys = tmp_path / "client-keys"
    keys.write_text("old-key\n")
    orch = orchestrator({"a": fake_model("a")}, env=KEYS, api_keys_file=str(keys))
    assert chat(orch, "a", key="old-key").status_code == 200
    pid = pids(orch)["a"][1]
    keys.write_text("# rotated\nnew-key, other-key\n")
    assert chat(orch, "a", key="new-key").status_code == 401  # read at a reload, not per request
    answer = reload(orch).json()
    assert answer["applied"] is False and answer["refused"] == {}  # the file's keys changed, not models.yaml
    assert chat(orch, "a", key="old-key").status_code == 401
    assert chat(orch, "a", key="new-key").status_code == 200 and chat(orch, "a", key="other-key").status_code == 200
    assert pids(orch)["a"] == ("ready", pid)


def test_sighup_reloads_like_the_admin_route(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a")}, env=KEYS)
    hash_before = status(orch)["config"]["hash"]
    rewrite(orch, lambda config: config["models"].update(b=fake_model("b")))
    orch.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "b" in status(orch)["models"], 10), orch.log()
    loaded = status(orch)["config"]
    assert loaded["hash"] != hash_before and loaded["cause"] == "SIGHUP" and loaded["loaded_at"] <= time.time()
    assert chat(orch, "b").status_code == 200 and orch.process.poll() is None


def test_the_file_watch_reloads_a_changed_file_once_it_is_still(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a")}, env=KEYS, watch_config=True)
    rewrite(orch, lambda config: config["models"].update(b=fake_model("b")))
    assert wait_until(lambda: "b" in status(orch)["models"], 15), orch.log()
    assert status(orch)["config"]["cause"] == "file watch" and chat(orch, "b").status_code == 200
    orch.config.write_text("models: [not, a, mapping]\n")  # invalid: refused, logged, nothing changes
    assert wait_until(lambda: "reload (file watch) refused" in orch.log(), 15), orch.log()
    assert set(status(orch)["models"]) == {"a", "b"}


def test_settings_apply_live_and_what_needs_a_restart_is_refused_with_why(orchestrator: Any) -> None:
    orch = orchestrator({"a": fake_model("a", vram_gb=1), "b": fake_model("b", vram_gb=1)}, env=KEYS,
                        gpu_memory_gb=10)
    assert chat(orch, "a", content="x" * 3000).status_code == 200

    def change(config: dict[str, Any]) -> None:
        config["settings"].update(port=config["settings"]["port"] + 1, defaults={"text": "b"},
                                  limits={"json_body_mb": 0.002}, gpu_memory_gb=20)
        config["models"]["c"] = fake_model("c", preload=True, vram_gb=1)
    rewrite(orch, change)
    answer = reload(orch).json()
    assert set(answer["refused"]) == {"port"} and "restart of the orchestrator" in answer["refused"]["port"]
    assert answer["settings_changed_live"] == ["gpu_memory_gb", "defaults", "limits.json_body_mb"]
    assert answer["added"] == ["c"] and status(orch)["gpu_budget_gb"] == 20
    too_big = chat(orch, "a", content="x" * 3000)  # still on the old port: the new limit, at once
    assert too_big.status_code == 413, too_big.text
    no_model = httpx.post(orch.url + "/v1/chat/completions", headers=ADMIN, timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}]})
    assert no_model.json()["model"] == "b"  # the new default
    assert wait_until(lambda: pids(orch)["c"][0] == "ready", 20), orch.log()  # preloaded, not asked for
    metrics = httpx.get(orch.url + "/metrics", headers=ADMIN, timeout=10).text
    assert 'aio_config_reloads_total{result="applied"} 1.0' in metrics

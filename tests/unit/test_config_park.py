"""The `park:` key, settings.host_memory_gb, and what they resolve to (no processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.common.contract import PARK_PATHS
from core.config.park import VLLM_DEV_PATHS, ParkSpec
from core.config.schema import ModelSpec, Settings
from core.host.host_memory import host_memory_gb, resolve_host_budget
from core.supervision.park_client import SERVICE_CALLS, calls_of, private_paths
from tests.unit.test_config import config_error, good, write


def spec(**park: Any) -> ModelSpec:
    return ModelSpec.model_validate({"type": "text", "service_script": "s.py", "port": 8001, "park": park})


def command_spec(**park: Any) -> ModelSpec:
    return ModelSpec.model_validate({"type": "text", "command": "serve", "port": 8001, "park": park})


def test_defaults_park_at_level_1_when_needed_only() -> None:
    park = ParkSpec()
    assert (park.enabled, park.level, park.host_gb, park.idle, park.calls, park.timeout) == (
        True, 1, None, 0, None, 300)
    assert Settings().host_memory_gb == "auto" and Settings().host_memory_reserve_gb == 16


def test_a_service_script_parks_through_its_own_routes_and_a_command_only_with_calls() -> None:
    assert calls_of(spec()) == SERVICE_CALLS
    assert calls_of(spec(enabled=False)) is None
    assert calls_of(command_spec()) is None  # no way to park a plain command: it is stopped


def test_the_vllm_preset_wakes_level_2_in_vllms_full_order() -> None:
    calls = calls_of(command_spec(calls="vllm", level=2))
    assert calls is not None
    assert [call.path for call in calls.park] == ["/sleep?level={level}&mode=wait"]
    assert [(c.path, c.body) for c in calls.restore if not c.optional] == [
        ("/wake_up?tags=weights", None), ("/collective_rpc", {"method": "reload_weights"}),
        ("/wake_up?tags=kv_cache", None), ("/reset_prefix_cache", None)]
    assert [c.path for c in calls.restore if c.optional] == ["/v1/completions"]  # the warm-up may fail
    level_1 = calls_of(command_spec(calls="vllm"))
    assert level_1 is not None and [c.path for c in level_1.restore if not c.optional] == ["/wake_up"]


def test_private_paths_cover_the_park_routes_and_every_vllm_dev_route() -> None:
    assert private_paths(spec()) == frozenset(PARK_PATHS)
    assert private_paths(command_spec()) == frozenset()
    vllm = private_paths(command_spec(calls="vllm"))
    assert {"/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"} <= vllm
    assert set(VLLM_DEV_PATHS) <= vllm and "/v1/completions" not in vllm  # the optional warm-up stays public
    custom = private_paths(command_spec(calls={"park": [{"path": "/pause?x=1"}], "restore": [{"path": "/go"}],
                                               "private_paths": ["/admin"]}))
    assert custom == {"/pause", "/go", "/admin"}


@pytest.mark.parametrize(("park", "message"), [
    ({"level": 3}, "model 'a': key 'park.level': Input should be 1 or 2"),
    ({"idle": -1}, "model 'a': key 'park.idle'"),
    ({"sleep": True}, "model 'a': key 'park.sleep': unknown key"),
    ({"calls": "sglang"}, "model 'a': key 'park.calls"),
    ({"calls": {"park": [{"path": "sleep"}], "restore": [{"path": "/wake"}]}}, "must start with '/'"),
    ({"calls": {"park": [], "restore": [{"path": "/wake"}]}}, "key 'park.calls.ParkCalls.park'"),
    ({"idle": 30}, "model 'a': key 'park.idle': a command model parks only through park.calls"),
])
def test_bad_park_keys_are_named(tmp_path: Path, park: dict[str, Any], message: str) -> None:
    data = good()
    data["models"]["a"]["park"] = park
    _, error = config_error(tmp_path, data)
    assert message in error


def test_a_command_model_with_calls_may_park_on_idle(tmp_path: Path) -> None:
    from core.config.load import load_config

    data = good()
    data["models"]["a"]["park"] = {"idle": 30, "calls": "vllm", "level": 2}
    assert load_config(write(tmp_path, data)).models["a"].park.level == 2


def test_host_budget_auto_is_memory_minus_the_reserve() -> None:
    assert resolve_host_budget(12, 16) == 12.0
    assert resolve_host_budget("auto", 0) == pytest.approx(host_memory_gb())
    assert resolve_host_budget("auto", 1e6) == 0.0  # never negative: parking is off
    assert 0 < host_memory_gb() < 1e5

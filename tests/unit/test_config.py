"""load_config: what a good models.yaml gives, and how every kind of bad one is refused."""

from __future__ import annotations

import copy
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config.launch import service_argv
from core.config.load import load_config
from core.config.schema import ConfigError, ModelSpec, Settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: Any, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def good() -> dict[str, Any]:
    return {
        "models": {
            "a": {"type": "text", "command": "serve --port {port}", "port": 8001},
            "b": {"type": "embedding", "command": ["embed", "--port", "{port}"], "port": 8002},
        }
    }


def config_error(tmp_path: Path, data: Any) -> tuple[Path, str]:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path.resolve(), str(info.value)


# --- good files ------------------------------------------------------------------------


def test_good_file_names_aliases_and_defaults(tmp_path: Path) -> None:
    data = good()
    data["models"]["a"]["aliases"] = ["alpha", "first"]
    config = load_config(write(tmp_path, data))

    assert list(config.models) == ["a", "b"]
    a, b = config.models["a"], config.models["b"]
    assert (a.name, b.name) == ("a", "b")
    assert a.names() == ["a", "alpha", "first"]
    assert b.names() == ["b"]
    assert a.base_url() == "http://127.0.0.1:8001"
    assert config.source == (tmp_path / "models.yaml").resolve()
    assert config.base_dir == tmp_path.resolve()
    assert config.settings == Settings()


def test_settings_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.gpu_memory_gb, s.log_dir, s.base_dir) == ("127.0.0.1", 9000, "auto", "logs", None)
    assert (s.defaults, s.max_queue, s.max_wait, s.batch_window) == ({}, 64, 600, 5)
    assert (s.restart_backoff, s.restart_backoff_max, s.restart_window, s.failed_cooldown) == (1, 60, 300, 300)
    assert (s.drain_timeout, s.api_key_env, s.log_lines) == (30, "AIO_API_KEYS", 2000)


def test_model_spec_defaults(tmp_path: Path) -> None:
    spec = load_config(write(tmp_path, good())).models["a"]
    assert isinstance(spec, ModelSpec)
    assert (spec.service_script, spec.args, spec.env, spec.python) == (None, [], {}, None)
    assert (spec.host, spec.startup_time, spec.endpoint, spec.aliases) == ("127.0.0.1", 120, None, [])
    assert (spec.vram_gb, spec.ttl, spec.pinned, spec.preload) == (None, 0, False, False)
    assert (spec.health_path, spec.max_concurrency, spec.stop_timeout) == ("/health", 32, 15)
    assert (spec.request_timeout, spec.max_restarts, spec.metadata) == (600, 3, {})


def test_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    data = good()
    data["settings"] = {"base_dir": "../srv", "log_dir": "var/log"}
    (tmp_path / "conf").mkdir()
    config = load_config(write(tmp_path / "conf", data))

    assert config.base_dir == (tmp_path / "srv").resolve()
    assert config.resolve_path("x/y.py") == (tmp_path / "srv" / "x" / "y.py").resolve()
    assert config.resolve_path("/abs/file") == Path("/abs/file")
    assert config.resolve_path("~/file") == Path(os.path.expanduser("~/file"))
    assert config.log_dir() == (tmp_path / "srv" / "var" / "log").resolve()


def test_service_argv_command_string_fills_placeholders_and_keeps_json(tmp_path: Path) -> None:
    data = good()
    data["models"]["a"].update(
        command="vllm serve '{model} weights' --host {host} --port={port}",
        args=["--override", '{"a": 1, "port": "{port}"}', "{x}"],
        host="0.0.0.0",
    )
    spec = load_config(write(tmp_path, data)).models["a"]
    assert service_argv(spec, "/usr/bin/py", tmp_path) == [
        "vllm", "serve", "a weights", "--host", "0.0.0.0", "--port=8001",
        "--override", '{"a": 1, "port": "8001"}', "{x}",
    ]


def test_service_argv_command_list(tmp_path: Path) -> None:
    data = good()
    data["models"]["b"]["command"] = ["{python}", "-m", "srv", "--name", "{model}", "--port", "{port}"]
    data["models"]["b"]["args"] = ['{"a": 1}']
    spec = load_config(write(tmp_path, data)).models["b"]
    assert service_argv(spec, "/opt/py", tmp_path) == [
        "/opt/py", "-m", "srv", "--name", "b", "--port", "8002", '{"a": 1}'
    ]


def test_service_argv_service_script(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "server.py").write_text("")
    data = {"models": {"s": {"type": "image", "service_script": "srv/server.py", "port": 8100,
                             "args": ["--gpu", "{model}"]}}}
    config = load_config(write(tmp_path, data))
    argv = service_argv(config.models["s"], "/venv/bin/python", config.base_dir)
    script = str((tmp_path / "srv" / "server.py").resolve())
    assert argv == ["/venv/bin/python", script, "--host", "127.0.0.1", "--port", "8100", "--gpu", "s"]


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _script_with_python(tmp_path: Path, python: str) -> dict[str, Any]:
    _executable(tmp_path / ".venv" / "bin" / "python")
    (tmp_path / "server.py").write_text("")
    return {"models": {"s": {"type": "text", "service_script": "server.py", "python": python, "port": 8100}}}


@pytest.mark.parametrize("python", ["./.venv", ".venv/bin/python", "{tmp}/.venv", "sh", sys.executable])
def test_python_interpreter_forms_accepted(tmp_path: Path, python: str) -> None:
    python = python.format(tmp=tmp_path)
    data = _script_with_python(tmp_path, python)
    assert load_config(write(tmp_path, data)).models["s"].python == python



def test_python_bare_venv_folder_name_accepted(tmp_path: Path) -> None:
    data = _script_with_python(tmp_path, ".venv")
    assert load_config(write(tmp_path, data)).models["s"].python == ".venv"



def test_yaml_merge_keys_supported(tmp_path: Path) -> None:
    text = (
        "models:\n"
        "  a: &base\n    type: text\n    command: serve --port {port}\n    port: 8001\n"
        "  b:\n    <<: *base\n    port: 8002\n"
    )
    b = load_config(write(tmp_path, text)).models["b"]
    assert (b.type, b.command, b.port) == ("text", "serve --port {port}", 8002)


# --- bad files -------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any], Path], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets a dotted key ("models.a.port") in the good config."""

    def apply(data: dict[str, Any], _tmp: Path) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return apply


def _drop(model: str, key: str) -> Mutation:
    return lambda data, _tmp: data["models"][model].pop(key)


def _script(model: str, **extra: Any) -> Mutation:
    """Switch a model to service_script (an existing file) and apply extra keys."""

    def apply(data: dict[str, Any], tmp: Path) -> None:
        (tmp / "server.py").write_text("")
        spec = data["models"][model]
        spec.pop("command")
        spec["service_script"] = "server.py"
        spec.update(extra)

    return apply


def _both(*mutations: Mutation) -> Mutation:
    def apply(data: dict[str, Any], tmp: Path) -> None:
        for mutation in mutations:
            mutation(data, tmp)

    return apply


BAD: list[tuple[str, Mutation, list[str]]] = [
    ("unknown-model-key", _set("models.a.colour", "red"),
     ["model 'a'", "key 'colour'", "unknown key (allowed: type, service_script, command, args,"]),
    ("misspelt-model-key", _set("models.a.tll", 60), ["model 'a'", "key 'tll'", "unknown key (did you mean 'ttl'?)"]),
    ("misspelt-park-key", _set("models.a.park", {"levle": 1}),
     ["model 'a'", "key 'park.levle'", "did you mean 'level'?"]),
    ("unknown-settings-key", _set("settings.prot", 1), ["key 'settings.prot'", "unknown key (did you mean 'port'?)"]),
    ("misspelt-limits-key", _set("settings.limits", {"json_body_m": 3}),
     ["key 'settings.limits.json_body_m'", "did you mean 'json_body_mb'?"]),
    ("unknown-top-key", _set("extra", 1), ["key 'extra'", "unknown key (allowed: settings, models)"]),
    ("missing-models", lambda data, _tmp: data.pop("models"), ["key 'models'", "required"]),
    ("missing-port", _drop("a", "port"), ["model 'a'", "key 'port'", "required"]),
    ("port-not-int", _set("models.a.port", "abc"), ["model 'a'", "key 'port'", "'abc'"]),
    ("port-too-big", _set("models.a.port", 70000), ["model 'a'", "key 'port'", "70000"]),
    ("port-zero", _set("models.a.port", 0), ["model 'a'", "key 'port'", "(got 0)"]),
    ("bad-type", _set("models.a.type", "video"), ["model 'a'", "key 'type'", "'video'"]),
    ("vram-negative", _set("models.a.vram_gb", -1), ["model 'a'", "key 'vram_gb'"]),
    ("settings-port-type", _set("settings.port", "x"), ["key 'settings.port'", "'x'"]),
    ("budget-type", _set("settings.gpu_memory_gb", "lots"), ["key 'settings.gpu_memory_gb", "'lots'"]),
    ("duplicate-port", _set("models.b.port", 8001),
     ["model 'b'", "key 'port'", "8001", "already used by model 'a'"]),
    ("port-is-settings-port", _set("models.a.port", 9000), ["model 'a'", "key 'port'", "9000", "settings"]),
    ("port-is-custom-settings-port", _both(_set("settings.port", 8002), _set("models.b.port", 8002)),
     ["model 'b'", "key 'port'", "8002", "settings"]),
    ("alias-is-other-name", _set("models.b.aliases", ["a"]),
     ["model 'b'", "key 'aliases'", "'a'", "already used by model 'a'"]),
    ("alias-in-two-models", _both(_set("models.a.aliases", ["x"]), _set("models.b.aliases", ["x"])),
     ["model 'b'", "key 'aliases'", "'x'", "already used by model 'a'"]),
    ("alias-twice", _set("models.a.aliases", ["x", "x"]), ["model 'a'", "key 'aliases'", "'x'", "listed twice"]),
    ("script-and-command", _set("models.a.service_script", "server.py"),
     ["model 'a'", "'service_script'", "'command'", "both"]),
    ("neither-script-nor-command", _drop("a", "command"),
     ["model 'a'", "'service_script'", "'command'", "neither"]),
    ("python-with-command", _set("models.a.python", "python3"), ["model 'a'", "key 'python'", "service_script"]),
    ("script-missing", _both(_drop("a", "command"), _set("models.a.service_script", "nope.py")),
     ["model 'a'", "key 'service_script'", "file not found", "nope.py"]),
    ("python-path-missing", _script("a", python="/nonexistent/bin/python"),
     ["model 'a'", "key 'python'", "/nonexistent/bin/python"]),
    ("python-name-missing", _script("a", python="no-such-python-xyz"),
     ["model 'a'", "key 'python'", "no-such-python-xyz"]),
    ("python-dir-without-bin", _script("a", python="./"), ["model 'a'", "key 'python'", "'./'"]),
    ("python-not-executable", _script("a", python="./server.py"), ["model 'a'", "key 'python'", "./server.py"]),
    ("default-unknown-model", _set("settings.defaults", {"text": "nope"}),
     ["settings", "key 'defaults.text'", "unknown model 'nope'"]),
    ("default-wrong-type", _set("settings.defaults", {"text": "b"}),
     ["settings", "key 'defaults.text'", "model 'b'", "'embedding'"]),
    ("default-unknown-type", _set("settings.defaults", {"video": "a"}), ["key 'settings.defaults.video", "'video'"]),
    ("vram-over-budget", _both(_set("settings.gpu_memory_gb", 24), _set("models.a.vram_gb", 40)),
     ["model 'a'", "key 'vram_gb'", "40", "24"]),
    ("vram-and-context-over-budget", _both(_both(_set("settings.gpu_memory_gb", 24),
                                                _set("settings.gpu_process_overhead_gb", 0.5)),
                                          _set("models.a.vram_gb", 23.8)),
     ["model 'a'", "key 'vram_gb'", "23.8", "24", "settings.gpu_process_overhead_gb"]),
    ("endpoint-relative", _set("models.a.endpoint", "v1/chat"), ["model 'a'", "key 'endpoint'", "'/'"]),
    # A client reaches a service only under /v1/, on a plain path (#19): another endpoint could never be served.
    ("endpoint-outside-v1", _set("models.a.endpoint", "/predict"), ["model 'a'", "key 'endpoint'", "under /v1/"]),
    ("endpoint-dot-segment", _set("models.a.endpoint", "/v1/../offload"), ["model 'a'", "key 'endpoint'", "plain"]),
    ("endpoint-encoded", _set("models.a.endpoint", "/v1/a%2Fb"), ["model 'a'", "key 'endpoint'", "plain"]),
    ("health-relative", _set("models.a.health_path", "health"), ["model 'a'", "key 'health_path'", "'/'"]),
    ("empty-command-string", _set("models.a.command", ""), ["model 'a'", "key 'command'", "empty"]),
    ("blank-command-string", _set("models.a.command", "   "), ["model 'a'", "key 'command'", "empty"]),
    ("empty-command-list", _set("models.b.command", []), ["model 'b'", "key 'command'", "empty"]),
]


@pytest.mark.parametrize(("mutate", "expected"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_config_names_file_model_and_key(tmp_path: Path, mutate: Mutation, expected: list[str]) -> None:
    data = copy.deepcopy(good())
    mutate(data, tmp_path)
    path, message = config_error(tmp_path, data)
    assert message.startswith(f"{path}: ")
    for fragment in expected:
        assert fragment in message


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    data = good()
    data["models"]["b"]["port"] = 8001
    data["models"]["a"]["aliases"] = ["b"]
    _, message = config_error(tmp_path, data)
    assert "key 'port'" in message
    assert "key 'aliases'" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  a: {type: text, command: x, port: 8001}\n  a: {type: text, command: y, port: 8002}\n",
         ["line 3", "duplicate key 'a'"]),
        ("models:\n  a:\n    type: text\n    command: x\n    port: 8001\n    port: 8002\n",
         ["line 6", "duplicate key 'port'"]),
        ("- a\n- b\n", ["expected a mapping", "list"]),
        ("", ["expected a mapping", "NoneType"]),
        ("models: [unclosed\n", ["not valid YAML"]),
        ("models:\n  a: {type: text\n", ["not valid YAML"]),
    ],
    ids=["duplicate-model", "duplicate-model-key", "list", "empty", "unclosed-list", "unclosed-map"],
)
def test_bad_yaml(tmp_path: Path, text: str, expected: list[str]) -> None:
    path, message = config_error(tmp_path, text)
    assert message.startswith(f"{path}: ")
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "models.yaml"
    if kind == "directory":
        path.mkdir()  # reading a directory fails with an OSError even as root
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path.resolve()}: ")


# --- shipped examples -------------------------------------------------------------------

EXAMPLES = sorted((REPO / "model-orchestrator").glob("models*.yaml"))


def test_example_configs_exist() -> None:
    assert EXAMPLES, "model-orchestrator/models*.yaml: no example config shipped"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.models
    assert config.source == path.resolve()

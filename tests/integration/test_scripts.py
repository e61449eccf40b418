"""scripts/start-all.sh and scripts/stop-all.sh against a real orchestrator and the fake service.

Every test runs the scripts as an operator would (subprocess, own runtime dir via
AIO_RUN_DIR), and the fixture stops whatever was started even if the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.integration.conftest import FAKE, ORCHESTRATOR, REPO, free_port, processes_with, wait_until
from tests.integration.manager_harness import alive

pytestmark = pytest.mark.integration

START = REPO / "scripts" / "start-all.sh"
STOP = REPO / "scripts" / "stop-all.sh"
RELOAD = REPO / "scripts" / "reload.sh"


@dataclass
class Setup:
    tmp: Path
    config: Path
    port: int
    service_port: int
    env: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "orchestrator.pid"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, script: Path, *args: str, timeout: float = 90, env_config: str | None = None
               ) -> subprocess.CompletedProcess[str]:
        env = self.env if env_config is None else {**self.env, "AIO_CONFIG": env_config}
        return subprocess.run([str(script), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=self.tmp)  # any cwd works

    def start(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.script(START, "--config", str(self.config), "--timeout", "30", *args)

    def start_with_soft_nofile(self, soft: int) -> subprocess.CompletedProcess[str]:
        """start-all.sh from a shell whose open-file soft limit is ``soft`` (a common default)."""
        return subprocess.run(["bash", "-c", f'ulimit -Sn {soft} && exec "$@"', "start", str(START),
                               "--config", str(self.config), "--timeout", "30"], env=self.env,
                              capture_output=True, text=True, timeout=90, check=False, cwd=self.tmp)

    def stop(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.script(STOP, *args)

    def pid(self) -> int:
        return int(self.pidfile.read_text().split()[0])

    def leftovers(self) -> list[psutil.Process]:
        return processes_with(str(self.config)) + processes_with(f"--port {self.service_port}")


def write_config(path: Path, port: int, service_port: int, **settings: object) -> Path:
    config = {
        "settings": {"port": port, "log_dir": str(path.parent / "logs"), "base_dir": str(REPO), **settings},
        "models": {
            "echo": {"type": "text", "service_script": FAKE, "args": ["--served-name", "echo"],
                     "port": service_port, "stop_timeout": 5},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    port, service_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "AIO_CONFIG"}
    env.update(AIO_RUN_DIR=str(tmp_path / "run"), AIO_PYTHON=sys.executable)
    s = Setup(tmp_path, write_config(tmp_path / "models.yaml", port, service_port), port, service_port, env)
    yield s
    # Teardown: the script first, then anything it missed, so no test leaks processes.
    s.stop("--timeout", "30")
    leaked = s.leftovers()
    for proc in leaked:
        proc.kill()
    assert not leaked, f"processes left behind: {leaked}"


def wait_gone(pid: int, timeout: float = 10) -> bool:
    return wait_until(lambda: not alive(pid), timeout)


def test_help_exits_zero() -> None:
    for script in (START, STOP):
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=10, check=False)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
        assert "--timeout" in result.stdout


def test_start_is_idempotent_serves_and_stop_cleans_up(setup: Setup) -> None:
    started = setup.start_with_soft_nofile(1024)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"running (pid {setup.pid()}) at {setup.url}" in started.stdout
    assert str(setup.run_dir / "orchestrator.log") in started.stdout
    pid = setup.pid()
    assert alive(pid)
    # The pid is python itself (exec, no wrapper shell), leading its own session (setsid:
    # a Ctrl-C in the operator's terminal does not reach it).
    assert "orchestrator.py" in " ".join(psutil.Process(pid).cmdline())
    assert os.getsid(pid) == pid
    assert httpx.get(setup.url + "/health", timeout=5).status_code == 200
    # The soft open-file limit was raised to the hard one (65536 or more where allowed).
    soft, hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft == hard and (soft >= 65536 or "open-file limit set to" in started.stderr), (soft, hard)
    # The orchestrator writes (and rotates) its own log, privately; stdout/stderr go to a file
    # of their own for what bypasses logging.
    log = setup.run_dir / "orchestrator.log"
    assert ["--log-file", str(log)] == psutil.Process(pid).cmdline()[-2:]
    assert stat.S_IMODE(setup.run_dir.stat().st_mode) == 0o700
    for name in ("orchestrator.log", "orchestrator.out"):
        assert stat.S_IMODE((setup.run_dir / name).stat().st_mode) == 0o600, name
    assert "start-all:" in (setup.run_dir / "orchestrator.out").read_text()

    again = setup.start()
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already running (pid {pid}) at {setup.url}" in again.stdout
    assert setup.pid() == pid

    assert not processes_with(f"--port {setup.service_port}")  # started on demand, not yet
    reply = httpx.post(setup.url + "/v1/chat/completions", timeout=60,
                       json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    services = processes_with(f"--port {setup.service_port}")
    assert services, "the chat request did not start the service"

    stopped = setup.stop()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped" in stopped.stdout
    assert wait_gone(pid, 5), "orchestrator still alive after stop-all"
    assert all(wait_gone(proc.pid, 5) for proc in services)
    assert not processes_with(f"--port {setup.service_port}")
    assert not setup.pidfile.exists()

    again = setup.stop()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "not running" in again.stdout


def test_reload_sh_applies_an_edited_config_and_keeps_the_running_model(setup: Setup) -> None:
    assert setup.script(RELOAD).returncode == 1  # nothing runs yet: says so
    started = setup.start()
    assert started.returncode == 0, started.stdout + started.stderr
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(setup.url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    service = processes_with(f"--port {setup.service_port}")
    config = yaml.safe_load(setup.config.read_text())
    config["models"]["echo"]["aliases"] = ["echo-2"]
    setup.config.write_text(yaml.safe_dump(config))
    reloaded = setup.script(RELOAD)
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    assert '"changed_live":{"echo":["aliases"]}' in reloaded.stdout.replace(" ", "")
    reply = httpx.post(setup.url + "/v1/chat/completions", json={**chat, "model": "echo-2"}, timeout=60)
    assert reply.status_code == 200 and processes_with(f"--port {setup.service_port}") == service
    setup.config.write_text("models: [not, a, mapping]\n")  # invalid: refused, nothing changes
    refused = setup.script(RELOAD)
    assert refused.returncode == 1 and "invalid_config" in refused.stdout and "nothing changed" in refused.stderr
    assert setup.stop().returncode == 0


def test_stale_pidfile_is_replaced(setup: Setup) -> None:
    setup.run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    setup.pidfile.write_text(f"{dead.pid}\n")

    stopped = setup.stop()
    assert stopped.returncode == 0
    assert "not running" in stopped.stdout
    assert not setup.pidfile.exists()

    setup.pidfile.write_text(f"{dead.pid}\n")
    started = setup.start()
    assert started.returncode == 0, started.stdout + started.stderr
    assert "stale pidfile" in started.stderr
    assert setup.pid() != dead.pid
    assert alive(setup.pid())


def test_invalid_config_fails_without_pidfile(setup: Setup) -> None:
    raw = yaml.safe_load(setup.config.read_text())
    raw["models"]["echo"]["no_such_key"] = 1
    setup.config.write_text(yaml.safe_dump(raw))

    result = setup.start()
    assert result.returncode != 0
    assert "invalid config" in result.stderr
    assert "no_such_key" in result.stderr
    assert not setup.pidfile.exists()
    assert not setup.leftovers()


def test_port_in_use_fails_without_pidfile(setup: Setup) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", setup.port))
        squatter.listen()
        result = setup.start()
    assert result.returncode != 0
    assert "already in use" in result.stderr
    assert f"in use by pid {os.getpid()}" in result.stderr  # the orchestrator's preflight names the holder
    assert not setup.pidfile.exists()
    assert not setup.leftovers()


def test_the_orchestrator_cli_answers_the_preflight_questions(setup: Setup) -> None:
    """start-all.sh asks orchestrator.py for the address and whether its port is free; nothing is served."""
    def preflight(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ORCHESTRATOR), "--config", str(setup.config), *args],
                              capture_output=True, text=True, timeout=60, check=False)

    from_config = preflight("--print-address", "--port-free")
    assert (from_config.returncode, from_config.stdout) == (0, f"127.0.0.1 {setup.port}\n"), from_config.stderr
    overridden = preflight("--print-address", "--host", "::1", "--port", str(setup.service_port))
    assert (overridden.returncode, overridden.stdout) == (0, f"::1 {setup.service_port}\n"), overridden.stderr
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", setup.port))
        squatter.listen()
        taken = preflight("--check", "--print-address", "--port-free")
    assert taken.returncode == 1
    assert taken.stdout.splitlines() == [f"{setup.config}: OK, 1 model: echo", f"127.0.0.1 {setup.port}"]
    assert f"cannot listen on 127.0.0.1:{setup.port}: in use by pid {os.getpid()}" in taken.stderr
    assert not setup.leftovers()


def test_check_validates_the_config_start_would_serve_and_starts_nothing(setup: Setup) -> None:
    checked = setup.start("--check")
    assert (checked.returncode, checked.stdout) == (0, f"{setup.config}: OK, 1 model: echo\n"), checked.stderr
    from_env = setup.script(START, "--check", env_config=str(setup.config))
    assert from_env.returncode == 0 and from_env.stdout.startswith(f"{setup.config}: OK"), from_env.stderr
    setup.config.write_text(setup.config.read_text().replace("stop_timeout:", "stop_timout:"))
    misspelt = setup.start("--check")
    assert misspelt.returncode == 2
    assert "model 'echo': key 'stop_timout': unknown key (did you mean 'stop_timeout'?)" in misspelt.stderr
    assert not setup.pidfile.exists() and not setup.leftovers()


def test_orchestrator_dying_at_startup_shows_its_log(setup: Setup) -> None:
    result = setup.start("--host", "192.0.2.1")  # TEST-NET address: not ours, so the bind fails
    assert result.returncode == 1
    assert "exited during startup" in result.stderr
    assert "192.0.2.1" in result.stderr  # the log tail names the failed bind
    assert not setup.pidfile.exists()
    assert not setup.leftovers()


def test_stop_kills_an_orchestrator_that_does_not_exit(setup: Setup) -> None:
    started = setup.start()
    assert started.returncode == 0, started.stdout + started.stderr
    pid = setup.pid()
    reply = httpx.post(setup.url + "/v1/chat/completions", timeout=60,
                       json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text
    services = processes_with(f"--port {setup.service_port}")
    assert services

    os.kill(pid, signal.SIGSTOP)  # frozen: SIGTERM stays pending, only SIGKILL ends it
    stopped = setup.stop("--timeout", "1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "SIGKILL" in stopped.stderr
    assert "stopped" in stopped.stdout
    assert wait_gone(pid, 5)
    assert all(wait_gone(proc.pid, 10) for proc in services), "services outlived a SIGKILLed orchestrator"
    assert not setup.pidfile.exists()


def test_a_deep_install_path_is_recognised_whatever_the_terminal_width(tmp_path: Path) -> None:
    # ps cuts `args` to $COLUMNS; a deep install path pushed "orchestrator" past column 80, so
    # stop-all took the live orchestrator for a stale pidfile and left it running.
    deep = tmp_path / ("d" * 90) / "ai-orchestrator"
    deep.mkdir(parents=True)
    script = deep / "orchestrator.py"
    script.write_text("import time\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        check = f'source {REPO}/scripts/lib/common.sh; is_orchestrator {proc.pid} && echo yes || echo no'
        done = subprocess.run(["bash", "-c", check], env={**os.environ, "COLUMNS": "80", "REPO_ROOT": str(REPO)},
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.stdout.strip() == "yes", done.stderr
    finally:
        proc.kill()
        proc.wait()

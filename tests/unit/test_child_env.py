"""core/supervision/child_env.py: children get an allowlist of our environment, never our secrets."""

from __future__ import annotations

import time
from typing import Any

import pytest

from core import REPO_ROOT
from core.common.contract import MODEL_NAME_ENV, SERVICE_TOKEN_ENV
from core.config.schema import ModelSpec
from core.host.memory_share import VRAM_ENV
from core.supervision.child_env import inherited, new_service_token, service_env

ORCHESTRATOR_ENV = {
    # what a pod's orchestrator typically has
    "PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
    "PYTHONPATH": "/opt/extra", "PYTHONDONTWRITEBYTECODE": "1", "VIRTUAL_ENV": "/venv",
    "LD_LIBRARY_PATH": "/usr/local/cuda/lib64", "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all",
    "HF_HOME": "/workspace/hf", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCH_HOME": "/t",
    "TORCHINDUCTOR_CACHE_DIR": "/c", "TRITON_CACHE_DIR": "/tr", "VLLM_CPU_KVCACHE_SPACE": "4",
    "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "XDG_CACHE_HOME": "/cache", "SSL_CERT_FILE": "/ca.pem",
    "TOKENIZERS_PARALLELISM": "false",
    # secrets and things the children have no business with
    "AIO_API_KEYS": "client-key", "AIO_ADMIN_KEYS": "admin-key", "HF_TOKEN": "hf_secret",
    "HUGGING_FACE_HUB_TOKEN": "hf_old", "VLLM_API_KEY": "vllm-key", "AWS_SECRET_ACCESS_KEY": "aws",
    "DB_PASSWORD": "pw", "GOOGLE_APPLICATION_CREDENTIALS": "/gcp.json", "TS_AUTHKEY": "tskey-auth-x",
    "RUNPOD_API_KEY": "rp", "HTTPS_PROXY": "http://user:pw@proxy:3128", "AIO_DATA_DIR": "/workspace/data",
    "PYTHONHOME": "/usr", "PYTHONSTARTUP": "/root/.pythonrc", "SOME_APP_SETTING": "x",
    SERVICE_TOKEN_ENV: "a-token-from-a-parent", VRAM_ENV: "12",
}
SECRETS = {"AIO_API_KEYS", "AIO_ADMIN_KEYS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY",
           "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS", "TS_AUTHKEY", "RUNPOD_API_KEY"}


def spec(**fields: Any) -> ModelSpec:
    return ModelSpec.model_validate({"type": "text", "service_script": "models/echo/server.py", "port": 8001,
                                     **fields})


def test_children_get_the_allowlist_and_no_secrets() -> None:
    env = service_env(spec(), base=ORCHESTRATOR_ENV)
    assert not SECRETS & env.keys(), SECRETS & env.keys()
    for name in ("HTTPS_PROXY", "AIO_DATA_DIR", "PYTHONHOME", "PYTHONSTARTUP", "SOME_APP_SETTING", VRAM_ENV,
                 SERVICE_TOKEN_ENV):
        assert name not in env, name
    kept = set(ORCHESTRATOR_ENV) - SECRETS - {"HTTPS_PROXY", "AIO_DATA_DIR", "PYTHONHOME", "PYTHONSTARTUP",
                                              "SOME_APP_SETTING", SERVICE_TOKEN_ENV, VRAM_ENV, "PYTHONPATH"}
    assert {name: env[name] for name in kept} == {name: ORCHESTRATOR_ENV[name] for name in kept}
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"] == f"{REPO_ROOT}:/opt/extra"  # `core` importable, the rest kept


def test_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = service_env(spec())
    assert "HF_TOKEN" not in env
    assert env["OMP_NUM_THREADS"] == "3"


def test_the_models_own_env_always_wins() -> None:
    env = service_env(spec(env={"HF_TOKEN": "hf_for_this_model", "OMP_NUM_THREADS": "8", "MY_FLAG": "1"}),
                      base=ORCHESTRATOR_ENV)
    assert env["HF_TOKEN"] == "hf_for_this_model"
    assert env["OMP_NUM_THREADS"] == "8"
    assert env["MY_FLAG"] == "1"


def test_passthrough_names_pass_secrets_prefixes_do_not() -> None:
    env = service_env(spec(), passthrough=["HF_TOKEN", "HTTPS_PROXY", "SOME_*", "AIO_*"], base=ORCHESTRATOR_ENV)
    assert env["HF_TOKEN"] == "hf_secret"  # named exactly: the operator asked for it
    assert env["HTTPS_PROXY"] == ORCHESTRATOR_ENV["HTTPS_PROXY"]
    assert env["SOME_APP_SETTING"] == "x"
    assert env["AIO_DATA_DIR"] == "/workspace/data"
    assert "AIO_API_KEYS" not in env and "AIO_ADMIN_KEYS" not in env  # a prefix never unlocks a secret
    assert SERVICE_TOKEN_ENV not in env and VRAM_ENV not in env


@pytest.mark.parametrize(("name", "passed"), [
    ("TOKENIZERS_PARALLELISM", True), ("HF_HUB_ENABLE_HF_TRANSFER", True), ("HF_TOKEN_PATH", False),
    ("VLLM_API_KEY", False), ("VLLM_USE_V1", True), ("CUDA_HOME", True), ("PYTORCH_CUDA_ALLOC_CONF", True),
    ("LC_CTYPE", True), ("PYTHONINSPECT", False), ("OPENAI_API_KEY", False), ("hf_token", False),
])
def test_inherited(name: str, passed: bool) -> None:
    assert inherited(name) is passed


def test_token_and_vram_share() -> None:
    token = new_service_token()
    assert len(token) >= 40 and token != new_service_token()
    entry = spec(vram_gb=0)
    entry.named("support-bot")  # as config loading names it
    env = service_env(entry, token, base=ORCHESTRATOR_ENV)
    assert env[SERVICE_TOKEN_ENV] == token
    assert env[VRAM_ENV] == "0"
    assert env[MODEL_NAME_ENV] == "support-bot"  # the service labels its logs and errors with it
    assert VRAM_ENV not in service_env(spec(), base=ORCHESTRATOR_ENV)


def test_every_service_numbers_gpus_as_nvml_does() -> None:
    # #20: CUDA's default order is fastest first, NVML's (the budgets, /status) is by PCI bus: without
    # this, "device 0" could be two different cards on a multi-GPU host.
    assert service_env(spec(), base={**ORCHESTRATOR_ENV, "CUDA_DEVICE_ORDER": "FASTEST_FIRST"})[
        "CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert service_env(spec(env={"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}), base=ORCHESTRATOR_ENV)[
        "CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"  # the model's own env still wins


def test_a_command_service_gets_no_repo_pythonpath() -> None:
    env = service_env(spec(service_script=None, command="vllm serve x --port {port}"), base=ORCHESTRATOR_ENV)
    assert env["PYTHONPATH"] == "/opt/extra"


def test_the_reaper_gets_the_allowlisted_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from core.supervision.reaper import Reaper

    monkeypatch.setenv("AIO_API_KEYS", "client-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    reaper = Reaper()
    reaper.start()
    try:
        assert reaper.pid is not None
        deadline = time.monotonic() + 5  # right after the exec the kernel may still show it empty (a busy machine)
        while not (environ := Path(f"/proc/{reaper.pid}/environ").read_bytes()) and time.monotonic() < deadline:
            time.sleep(0.01)
        names = {entry.partition(b"=")[0] for entry in environ.split(b"\0")}
        assert b"PATH" in names and b"PYTHONPATH" in names
        assert not names & {b"AIO_API_KEYS", b"HF_TOKEN"}
    finally:
        reaper.close()

"""scripts/download_models.py and download-models.sh against a fake hub on loopback (tests/provisioning/hub_server.py).

The CLI runs for real as a subprocess with the real huggingface_hub, pointed at the fake hub with
--endpoint (and HF_ENDPOINT, so nothing can reach huggingface.co even by mistake). The fake hub
answers the same routes and headers as huggingface.co, so these tests exercise huggingface_hub's
own resolve / redirect / resume / cache logic, plus the CLI's checks on top.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_until
from tests.provisioning.hub_server import FakeFile, FakeRepo, HubServer

pytest.importorskip("huggingface_hub", reason="download_models.py needs huggingface_hub in this environment")

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "scripts" / "download_models.py"
WRAPPER = REPO / "scripts" / "download-models.sh"
TOKEN = "hf_test_secret_token_123"
MIB = 1024 * 1024
CHUNK = 10 * MIB  # huggingface_hub writes (and so can resume from) whole 10 MiB chunks only


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.stdout.strip().splitlines()[-1]))

    def model(self, spec: str) -> dict[str, Any]:
        return dict(self.summary["models"][spec])


@pytest.fixture
def hub() -> Iterator[HubServer]:
    repos = [FakeRepo.small("acme/tiny"), FakeRepo.small("acme/big", weights_kb=12 * 1024),
             FakeRepo.small("acme/gated", gated_token=TOKEN)]
    with HubServer(repos) as server:
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub"


def base_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "AIO_"))}
    # HF_HOME in tmp: no stored token from this machine; HF_ENDPOINT: never huggingface.co.
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}


def run(cache: Path, endpoint: str, *args: str, env: dict[str, str] | None = None) -> Result:
    command = [sys.executable, str(CLI), "--cache-dir", str(cache), "--endpoint", endpoint, "--json", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
                          env=env or base_env(cache.parent, endpoint))
    return Result(proc.returncode, proc.stdout, proc.stderr)


def snapshot(cache: Path, repo: FakeRepo) -> Path:
    return cache / f"models--{repo.repo_id.replace('/', '--')}" / "snapshots" / repo.commit


def assert_files_match(cache: Path, repo: FakeRepo) -> None:
    for name, file in repo.files.items():
        assert (snapshot(cache, repo) / name).read_bytes() == file.content, name


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_first_download_fetches_every_file(hub: HubServer, cache: Path) -> None:
    repo = hub.repos[0]
    result = run(cache, hub.url, "acme/tiny")
    assert result.rc == 0, result.stderr
    assert result.summary["changed"] is True
    assert result.model("acme/tiny@main")["status"] == "downloaded"
    assert result.model("acme/tiny@main")["downloaded_bytes"] == sum(len(f.content) for f in repo.files.values())
    assert_files_match(cache, repo)
    assert len(hub.body_gets()) == 3


def test_second_run_is_offline_and_unchanged(hub: HubServer, cache: Path) -> None:
    assert run(cache, hub.url, "acme/tiny").rc == 0
    requests_before = len(hub.seen)
    again = run(cache, hub.url, "acme/tiny")
    assert again.rc == 0, again.stderr
    assert (again.summary["changed"], again.model("acme/tiny@main")["status"]) == (False, "present")
    assert len(hub.seen) == requests_before, "a complete snapshot must not cause any request"
    hub.stop()
    offline = run(cache, hub.url, "acme/tiny")
    assert offline.rc == 0, offline.stderr
    assert offline.summary["changed"] is False
    assert_files_match(cache, hub.repos[0])


def test_dropped_connection_resumes_with_range(hub: HubServer, cache: Path) -> None:
    big = hub.repos[1]
    hub.fail_after_bytes = CHUNK + MIB  # cut mid-file, after one whole chunk was written to disk
    result = run(cache, hub.url, "acme/big")
    assert result.rc == 0, result.stderr
    assert "resume" in result.stderr  # huggingface_hub's "Trying to resume download..."
    weights = [s for s in hub.body_gets() if s.path == f"/cdn/{big.files['model.safetensors'].sha256}"]
    assert [s.range for s in weights] == [None, f"bytes={CHUNK}-"]
    on_disk = (snapshot(cache, big) / "model.safetensors").read_bytes()
    assert hashlib.sha256(on_disk).hexdigest() == big.files["model.safetensors"].sha256


def test_killed_run_leaves_no_partial_file_behind(hub: HubServer, cache: Path) -> None:
    """huggingface_hub 2.x keeps a partial file only within one process (a unique `*.incomplete` temp file):
    a killed run orphans it. The next run deletes the orphan and downloads the file again, whole."""
    big = hub.repos[1]
    hub.stall_after_bytes = CHUNK + MIB
    command = [sys.executable, str(CLI), "--cache-dir", str(cache), "--endpoint", hub.url, "acme/big"]
    with subprocess.Popen(command, env=base_env(cache.parent, hub.url), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        assert hub.stalled.wait(20), "the download never reached the stall"
        blobs = cache / "models--acme--big" / "blobs"
        assert wait_until(lambda: any(p.stat().st_size >= CHUNK for p in blobs.glob("*.incomplete")), 10), \
            "no partial file with the first chunk appeared"
        proc.kill()  # as a pod stop would
    orphans = list(blobs.glob("*.incomplete"))
    assert orphans
    result = run(cache, hub.url, "acme/big")
    assert result.rc == 0, result.stderr
    assert f"removed {orphans[0].name}" in result.stderr
    assert list(blobs.glob("*.incomplete")) == []
    assert_files_match(cache, big)


@pytest.mark.parametrize(("name", "kind"), [("model.safetensors", "sha256"), ("config.json", "git sha1")])
def test_checksum_mismatch_fails_and_deletes_the_file(hub: HubServer, cache: Path, name: str, kind: str) -> None:
    repo = hub.repos[0]
    hub.corrupt = {name}
    result = run(cache, hub.url, "acme/tiny")
    assert result.rc == 1
    error = result.model("acme/tiny@main")["error"]
    assert "checksum mismatch" in error and name in error and kind in error
    assert not (snapshot(cache, repo) / name).exists()
    bad = repo.files[name]
    assert not (cache / "models--acme--tiny" / "blobs" / (bad.sha256 if bad.lfs else bad.git_oid)).exists()
    hub.corrupt.clear()
    fixed = run(cache, hub.url, "acme/tiny")
    assert fixed.rc == 0 and fixed.summary["changed"] is True, fixed.stderr
    assert_files_match(cache, repo)


@pytest.mark.parametrize(("spec", "message"), [
    ("acme/nope", "unknown repository acme/nope"),
    ("acme/tiny@v9", "unknown revision 'v9' of acme/tiny"),
])
def test_unknown_repo_or_revision(hub: HubServer, cache: Path, spec: str, message: str) -> None:
    result = run(cache, hub.url, spec)
    assert result.rc == 1
    assert message in result.summary["models"][next(iter(result.summary["models"]))]["error"]
    assert message in result.stderr


def test_unreachable_endpoint(cache: Path) -> None:
    url = closed_port_url()
    result = run(cache, url, "acme/tiny")
    assert result.rc == 1
    assert f"endpoint unreachable: {url}" in result.model("acme/tiny@main")["error"]


def test_gated_model_needs_the_token_and_never_prints_it(hub: HubServer, cache: Path) -> None:
    denied = run(cache, hub.url, "acme/gated")
    assert denied.rc == 1
    assert "set HF_TOKEN" in denied.model("acme/gated@main")["error"]
    assert "gated" in denied.model("acme/gated@main")["error"]
    env = {**base_env(cache.parent, hub.url), "MY_TOKEN": TOKEN}
    allowed = run(cache, hub.url, "--token-env", "MY_TOKEN", "acme/gated", env=env)
    assert allowed.rc == 0, allowed.stderr
    assert TOKEN not in allowed.stdout + allowed.stderr + denied.stdout + denied.stderr
    assert_files_match(cache, hub.repos[2])
    cdn = [s for s in hub.seen if s.path.startswith("/cdn/")]
    assert cdn and not any(s.authorized for s in cdn), "the token must not follow the redirect to the CDN"


def test_check_reports_missing_and_complete(hub: HubServer, cache: Path) -> None:
    missing = run(cache, hub.url, "--check", "acme/tiny", "acme/big")
    assert missing.rc == 1
    assert {m["status"] for m in missing.summary["models"].values()} == {"missing"}
    assert run(cache, hub.url, "acme/tiny").rc == 0
    hub.stop()
    mixed = run(cache, hub.url, "--check", "acme/tiny", "acme/big")
    assert mixed.rc == 1
    assert mixed.model("acme/tiny@main")["status"] == "complete"
    assert mixed.model("acme/big@main")["status"] == "missing"
    complete = run(cache, hub.url, "--check", "acme/tiny")
    assert complete.rc == 0 and complete.summary["changed"] is False


def test_patterns_limit_the_files_and_count_for_completeness(hub: HubServer, cache: Path) -> None:
    only_json = run(cache, hub.url, "--allow-patterns", "*.json", "acme/tiny")
    assert only_json.rc == 0, only_json.stderr
    assert sorted(p.name for p in snapshot(cache, hub.repos[0]).iterdir()) == ["config.json", "tokenizer.json"]
    assert run(cache, hub.url, "--check", "--allow-patterns", "*.json", "acme/tiny").rc == 0
    assert run(cache, hub.url, "--check", "acme/tiny").rc == 1  # the full snapshot still lacks the weights


def test_dry_run_lists_sizes_without_downloading(hub: HubServer, cache: Path) -> None:
    result = run(cache, hub.url, "--dry-run", "acme/big")
    assert result.rc == 0, result.stderr
    total = sum(len(f.content) for f in hub.repos[1].files.values())
    assert result.model("acme/big@main")["downloaded_bytes"] == total
    assert "3 of 3 files to download" in result.stderr
    assert hub.body_gets() == []


def test_verify_rehashes_the_cache_and_repairs_it(hub: HubServer, cache: Path) -> None:
    repo = hub.repos[0]
    assert run(cache, hub.url, "acme/tiny").rc == 0
    blob = (snapshot(cache, repo) / "model.safetensors").resolve()
    blob.write_bytes(b"\0" * blob.stat().st_size)  # bit rot on the volume: same size, wrong bytes
    assert run(cache, hub.url, "acme/tiny").model("acme/tiny@main")["status"] == "present"  # no hashing by default
    repaired = run(cache, hub.url, "--verify", "acme/tiny")
    assert repaired.rc == 0, repaired.stderr
    assert "checksum mismatch" in repaired.stderr and repaired.summary["changed"] is True
    assert_files_match(cache, repo)


def test_refresh_follows_a_moved_branch(hub: HubServer, cache: Path) -> None:
    repo = hub.repos[0]
    first = run(cache, hub.url, "acme/tiny").model("acme/tiny@main")["path"]
    repo.files["config.json"] = FakeFile("config.json", b'{"model_type": "fake", "v": 2}')
    repo.commit = "f" * 40  # a new commit on main
    assert run(cache, hub.url, "acme/tiny").model("acme/tiny@main")["path"] == first  # resolved once: no request
    refreshed = run(cache, hub.url, "--refresh", "acme/tiny")
    assert refreshed.rc == 0, refreshed.stderr
    assert refreshed.summary["changed"] is True
    assert refreshed.model("acme/tiny@main")["downloaded_bytes"] == len(repo.files["config.json"].content)
    assert_files_match(cache, repo)
    assert run(cache, hub.url, "--check", "acme/tiny").model("acme/tiny@main")["path"] == str(snapshot(cache, repo))


def wrapper(env: dict[str, str], *args: str) -> Result:
    proc = subprocess.run(["bash", str(WRAPPER), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**env, "AIO_PYTHON": sys.executable})
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_wrapper_help(tmp_path: Path) -> None:
    result = wrapper(base_env(tmp_path, closed_port_url()), "--help")
    assert result.rc == 0, result.stderr
    assert "Qwen/Qwen2.5-7B-Instruct" in result.stdout and "HF_TOKEN" in result.stdout
    assert "--check" in result.stdout  # the CLI's own options follow the wrapper's notes


def test_wrapper_defaults_to_the_gpu_profiles_weights_under_aio_data_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in base_env(tmp_path, closed_port_url()).items() if k != "HF_HOME"}
    result = wrapper({**env, "AIO_DATA_DIR": str(tmp_path / "data")}, "--check", "--json")
    assert result.rc == 1  # nothing downloaded: all six are missing (and --check never goes online)
    assert result.summary["cache_dir"] == str(tmp_path / "data" / "hf" / "hub")
    assert sorted(result.summary["models"]) == [  # the served profile's `weights`, nothing else
        "BAAI/bge-reranker-v2-m3@main", "Qwen/Qwen2.5-7B-Instruct@main", "black-forest-labs/FLUX.1-schnell@main",
        "facebook/musicgen-medium@main", "openai/whisper-large-v3-turbo@main",
        "sentence-transformers/all-MiniLM-L6-v2@main"]


def test_wrapper_passes_arguments_through(hub: HubServer, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    args = ("--cache-dir", str(cache), "--endpoint", hub.url, "--json", "acme/tiny")
    result = wrapper(base_env(tmp_path, hub.url), *args)
    assert result.rc == 0, result.stderr
    assert result.summary["changed"] is True
    assert_files_match(cache, hub.repos[0])

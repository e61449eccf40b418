"""CI's rehearsal of the GPU pod: the shipped GPU profile, provisioned, served and used end to end.

What a user does on a pod, on a machine without a GPU: `ansible-playbook` with the gpu profile
(through the rehearsal switch), `scripts/start-all.sh`, requests of every kind through the
official `openai` client, an eviction, `scripts/stop-all.sh`. The differences from a pod are
weights, devices and the CPU builds of torch and vLLM, listed in core/config/rehearsal.py:

- "the image's Python" is a copy of this machine's interpreter with CPU torch 2.13.0 and
  nothing else, so that the model environment built over it can only reuse that torch;
- the weights are tiny stand-ins under the real repo ids (tests/provisioning/standins.py),
  served by a hub-compatible server on loopback, which the `models` tag downloads from.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import OpenAI

from core.config.load import load_config
from core.config.render import downloads
from tests.integration.conftest import free_port
from tests.models.test_whisper import tone
from tests.provisioning.hub_server import HubServer
from tests.provisioning.standins import BUILDERS, DECOYS, standin_repo
from tests.provisioning.test_playbook import ANSIBLE_BIN, REPO, recap, run

CLIENT_KEY, ADMIN_KEY = "rehearsal-client-key", "rehearsal-admin-key"

PROFILE = REPO / "model-orchestrator" / "models.yaml"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not (ANSIBLE_BIN / "ansible-playbook").exists(),
                       reason=f"no Ansible tooling in {ANSIBLE_BIN} (scripts/test.sh creates it)"),
]


def make_image_python(dest: Path) -> Path:
    """A standalone copy of this machine's interpreter (no site-packages) with CPU torch installed.

    It plays a GPU image's system Python: torch in its own site-packages, where a virtual
    environment made with --system-site-packages sees it (a venv would not pass it on).
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(sys.base_prefix)
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(Path(sys._base_executable).resolve(), dest / "bin" / version)  # type: ignore[attr-defined]
    (dest / "bin" / "python3").symlink_to(version)
    ignore = shutil.ignore_patterns("site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo")
    shutil.copytree(base / "lib" / version, dest / "lib" / version, ignore=ignore, symlinks=True)
    (dest / "lib" / version / "site-packages").mkdir()
    shutil.copytree(base / "include", dest / "include", symlinks=True)  # torch's compiler needs Python.h
    for shared in base.glob(f"lib/lib{version}*.so*"):
        shutil.copy2(shared, dest / "lib" / shared.name, follow_symlinks=False)
    python = dest / "bin" / "python3"
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert Path(prefix) == dest, f"the copy still uses {prefix}"
    for step in (["-m", "ensurepip", "--default-pip"],
                 ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "torch==2.13.0"]):
        subprocess.run([python, *step], check=True, capture_output=True, text=True)
    return python


def torch_location(python: Path | str) -> str:
    return subprocess.run([str(python), "-c", "import torch; print(torch.__file__)"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Provision the GPU profile (rehearsal) into a fresh data folder; stop whatever it started."""
    root = tmp_path_factory.mktemp("gpu-rehearsal")
    image_python = make_image_python(root / "image-python")
    data = root / "data"
    repos = [standin_repo(d["repo"]) for d in downloads(load_config_raw())]
    with HubServer(repos) as hub:
        done = run("ansible-playbook", "playbook.yml", "--skip-tags", "tailscale", "-e", "aio_profile=gpu",
                   "-e", "aio_rehearsal=true", "-e", f"aio_system_python={image_python}",
                   "-e", f"aio_data_dir={data}", "-e", f"aio_hf_endpoint={hub.url}")
        requested = {s.path for s in hub.seen}
    # The profile listens on 0.0.0.0, so like a real pod it needs keys (it refuses to start without).
    env = {**os.environ, "AIO_RUN_DIR": str(root / "run"), "AIO_DATA_DIR": str(data),
           "AIO_API_KEYS": CLIENT_KEY, "AIO_ADMIN_KEYS": ADMIN_KEY}
    yield {"data": data, "image_python": image_python, "playbook": done, "requested": requested, "env": env,
           "root": root}
    subprocess.run([str(REPO / "scripts" / "stop-all.sh")], env=env, capture_output=True, check=False, timeout=300)


def load_config_raw() -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load(PROFILE.read_text())
    return data


def test_every_weight_the_profile_loads_has_a_standin() -> None:
    assert {d["repo"] for d in downloads(load_config_raw())} == set(BUILDERS)


def test_the_playbook_provisions_the_gpu_profile(pod: dict[str, Any]) -> None:
    done = pod["playbook"]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert recap(done.stdout)["failed"] == 0
    flat = " ".join(done.stdout.split())
    assert "Profile gpu (CI rehearsal on CPU)" in flat
    for name in load_config(PROFILE).models:
        assert f"ok {name}:" in flat, name  # validate: interpreter and engine imports, per model


def test_no_service_environment_brings_its_own_torch(pod: dict[str, Any]) -> None:
    image_torch = torch_location(pod["image_python"])
    assert image_torch.startswith(str(pod["root"] / "image-python"))
    models_env = pod["data"] / "venvs" / "models-gpu"
    assert torch_location(models_env / "bin" / "python") == image_torch
    assert not list(models_env.glob("lib/python*/site-packages/torch"))


def test_only_the_files_the_services_load_were_downloaded(pod: dict[str, Any]) -> None:
    for repo, decoys in DECOYS.items():
        (snapshot,) = (pod["data"] / "hf" / "hub").glob(f"models--{repo.replace('/', '--')}/snapshots/*")
        fetched = {str(path.relative_to(snapshot)) for path in snapshot.rglob("*") if path.is_file()}
        assert fetched and not fetched & set(decoys), (repo, sorted(fetched))
        assert not any(repo in path and path.endswith(tuple(decoys)) for path in pod["requested"]), repo
    flux = next((pod["data"] / "hf" / "hub").glob("models--black-forest-labs--FLUX.1-schnell/snapshots/*"))
    assert (flux / "model_index.json").is_file() and list(flux.glob("transformer/*.safetensors"))


@pytest.fixture(scope="module")
def served(pod: dict[str, Any]) -> Iterator[str]:
    port = free_port()
    start = subprocess.run([str(REPO / "scripts" / "start-all.sh"), "--port", str(port), "--timeout", "120"],
                           env=pod["env"], capture_output=True, text=True, timeout=300, check=False)
    assert start.returncode == 0, start.stdout + start.stderr
    names = ", ".join(load_config(PROFILE).models)
    assert f"serving {pod['data'] / 'models.yaml'}: OK, 7 models: {names}" in start.stdout
    yield f"http://127.0.0.1:{port}"
    subprocess.run([str(REPO / "scripts" / "stop-all.sh")], env=pod["env"], capture_output=True, timeout=300,
                   check=False)


def test_every_model_type_answers_through_the_openai_client(pod: dict[str, Any], served: str) -> None:
    client = OpenAI(base_url=served + "/v1", api_key=CLIENT_KEY, timeout=600)
    chat = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8,
                                          messages=[{"role": "user", "content": "Say hi."}])
    assert chat.model == "qwen2.5-7b-instruct" and chat.usage is not None and chat.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="qwen2.5-7b-instruct", stream=True, max_tokens=8,
                                                 messages=[{"role": "user", "content": "Count."}]))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    _tool_call_and_schema(client, whitespace_bias(pod["data"]))
    image = client.images.generate(model="flux.1-schnell", prompt="a red fox", size="64x64",
                                   response_format="b64_json")
    assert image.data is not None and base64.b64decode(image.data[0].b64_json or "").startswith(b"\x89PNG")
    speech = client.audio.speech.create(model="musicgen-medium", voice="alloy", input="calm piano",
                                        response_format="wav", extra_body={"duration": 1})
    assert speech.content.startswith(b"RIFF")
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a cat sits", "a dog runs"])
    assert [len(v.embedding) for v in vectors.data] == [384, 384]
    ranked = client.post("/rerank", cast_to=httpx.Response, body={  # no rerank method in the client
        "model": "rerank-v3.5", "query": "where do cats sit", "documents": ["a cat sits", "gpus"], "top_n": 1})
    assert ranked.json()["model"] == "bge-reranker-v2-m3" and len(ranked.json()["results"]) == 1
    heard = client.audio.transcriptions.create(model="whisper-1", file=("tone.wav", tone(2.0)),
                                               response_format="verbose_json", timestamp_granularities=["segment"])
    assert heard.duration == pytest.approx(2.0, abs=0.01) and heard.segments is not None


def _tool_call_and_schema(client: OpenAI, no_space: dict[str, int]) -> None:
    """vLLM's structured decoding holds even random weights to the schema: a strict tool's arguments and
    a json_schema answer are valid. ``no_space`` keeps the random model from piling up the whitespace JSON
    allows between tokens past max_tokens; the grammar decides everything else."""
    weather: Any = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}}}
    called = client.chat.completions.create(model="qwen2.5-7b-instruct", max_tokens=400, tools=[weather],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            logit_bias=no_space, messages=[{"role": "user", "content": "Paris?"}])
    (call,) = called.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    schema = weather["function"]["parameters"]
    answer = client.chat.completions.create(
        model="qwen2.5-7b-instruct", max_tokens=400, logit_bias=no_space,
        messages=[{"role": "user", "content": "A city?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert json.loads(answer.choices[0].message.content or "")["city"] in ("Paris", "Rome")


def whitespace_bias(data: Path) -> dict[str, int]:
    """logit_bias against every whitespace token of the served Qwen stand-in (from the downloaded tokenizer)."""
    from tokenizers import Tokenizer

    (path,) = (data / "hf" / "hub").glob("models--Qwen--Qwen2.5-7B-Instruct/snapshots/*/tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    return {str(token): -100 for token in range(tokenizer.get_vocab_size()) if tokenizer.decode([token]).isspace()}


def test_a_pretend_48_gb_gpu_swaps_qwen_and_flux(served: str) -> None:
    client = OpenAI(base_url=served + "/v1", api_key=CLIENT_KEY, timeout=600)
    client.chat.completions.create(model="qwen2.5-7b-instruct", max_tokens=2,
                                   messages=[{"role": "user", "content": "x"}])
    client.images.generate(model="flux.1-schnell", prompt="x", size="64x64")
    models = httpx.get(served + "/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       timeout=30).json()["models"]
    states = {name: model["state"] for name, model in models.items()}
    assert states["flux.1-schnell"] == "ready" and states["qwen2.5-7b-instruct"] == "stopped"


def test_stop_all_leaves_no_process_behind(pod: dict[str, Any], served: str) -> None:
    done = subprocess.run([str(REPO / "scripts" / "stop-all.sh")], env=pod["env"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    marker = str(pod["data"])
    # A zombie has exited: it holds no memory, port or GPU, only its entry until its parent (here the
    # test run, which adopts orphans as subreaper) reaps it; on a loaded machine that may lag (#21).
    live = [p for p in psutil.process_iter(["cmdline", "name", "status"]) if p.info["status"] != psutil.STATUS_ZOMBIE]
    left = [p for p in live if marker in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    # vLLM renames its engine processes (VLLM::EngineCore): theirs carry the pod's paths in their
    # environment. Another test process may run a vLLM engine of its own meanwhile (pytest -n 2).
    engines = [p for p in live if (p.info["name"] or "").startswith("VLLM::") and marker in _environ_text(p)]
    assert not engines, [(p.pid, p.info["name"]) for p in engines]


def _environ_text(process: psutil.Process) -> str:
    try:
        return " ".join(process.environ().values())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""

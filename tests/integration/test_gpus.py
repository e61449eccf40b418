"""Every GPU of the pod, through a real orchestrator over the stand-in NVML (tests/fakes/nvml: a mock
of the driver, which cannot run here): the inventory its own CUDA_VISIBLE_DEVICES allows, the budget
of the device services land on, what /status shows, and MIG refused before serving."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import stand_in_nvml
from tests.integration.conftest import ORCHESTRATOR, REPO, fake_driver, fake_model, wait_until, write_config

GIB = 1024**3


H100 = {"name": "NVIDIA H100 80GB HBM3", "total_gb": 80}
RTX4090 = {"name": "NVIDIA GeForce RTX 4090", "total_gb": 24}


def test_under_a_mask_the_orchestrator_places_on_its_own_gpus_only(orchestrator: Any, tmp_path: Path) -> None:
    env = fake_driver(tmp_path, H100, H100, RTX4090, RTX4090)
    env.update(CUDA_VISIBLE_DEVICES="2,3", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    model = fake_model("a", "--gpu-memory-utilization", "{gpu_memory_utilization}", vram_gb=10)
    orch = orchestrator({"a": model}, env=env, gpu_memory_gb="auto",
                        gpu_process_overhead_gb=0, env_passthrough=["AIO_FAKE_NVML"])  # children see the driver too
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    assert [(g["index"], g["name"], g["total_gb"], g["used_gb"]) for g in status["gpus"]] == [
        (2, "NVIDIA GeForce RTX 4090", 24.0, 0.0), (3, "NVIDIA GeForce RTX 4090", 24.0, 0.0)]
    assert status["gpu_budget_gb"] == 24.0  # the first card it may use (GPU 0's 80 GB is not ours)
    body = {"model": "a", "messages": [{"role": "user", "content": "hello"}]}
    assert httpx.post(orch.url + "/v1/chat/completions", json=body, headers=orch.admin_headers,
                      timeout=60).status_code == 200
    who = httpx.get(orch.url + "/upstream/a/whoami", headers=orch.admin_headers, timeout=10).json()
    devices = who["devices"]
    assert who["gpu_memory_utilization"] == "0.4166"  # 10 of GPU 2's 24 GB, rounded down as vLLM's service does
    # Placed on GPU 2 (pack: a tie, the lowest index), named by its NVML index, never as ordinal 0 of the mask
    assert devices == {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "AIO_VRAM_GB": "10",
                       "AIO_TENSOR_PARALLEL": None}
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    assert [(g["used_gb"], g["models"]) for g in status["gpus"]] == [(10.0, ["a"]), (0.0, [])]
    assert status["models"]["a"]["vram_used_gb"] == 10.0 and status["models"]["a"]["devices"] == [2]
    assert "GPUs: 2 NVIDIA GeForce RTX 4090 24 GB GPU-02" in orch.log()


def test_without_a_mask_every_gpu_is_listed_and_the_first_sets_the_budget(orchestrator: Any, tmp_path: Path) -> None:
    orch = orchestrator({"a": fake_model("a")}, env=fake_driver(tmp_path, RTX4090, H100), gpu_memory_gb="auto")
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    assert [(g["index"], g["pci_bus_id"]) for g in status["gpus"]] == [(0, "00000000:41:00.0"), (1, "00000000:42:00.0")]
    assert status["gpu_budget_gb"] == 24.0


def ask(orch: Any, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    response = httpx.post(orch.url + "/v1/chat/completions", json=body, headers=orch.admin_headers, timeout=60)
    assert response.status_code == 200, response.text


def placed(orch: Any) -> tuple[dict[str, tuple[str, list[int]]], list[tuple[float | None, list[str]]]]:
    """(model → (state, GPUs)), and per GPU (NVML's used GB, the models placed on it)."""
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    return ({name: (m["state"], m["devices"]) for name, m in status["models"].items()},
            [(g["used_gb"], g["models"]) for g in status["gpus"]])


def test_two_24_gb_gpus_place_evict_per_gpu_and_restore_where_parked(orchestrator: Any, tmp_path: Path) -> None:
    models = {"a": fake_model("a", vram_gb=14), "b": fake_model("b", vram_gb=14),
              "c": fake_model("c", vram_gb=8), "d": fake_model("d", vram_gb=14)}
    orch = orchestrator(models, env=fake_driver(tmp_path, RTX4090, RTX4090), gpu_memory_gb="auto",
                        gpu_process_overhead_gb=0, host_memory_gb=100, env_passthrough=["AIO_FAKE_NVML"])
    for name in ("a", "b", "c"):
        ask(orch, name)
    models_now, gpus = placed(orch)
    # a on GPU 0; b does not fit beside it and takes GPU 1; c packs beside a (both leave 2 GB: the lower index)
    assert models_now == {"a": ("ready", [0]), "b": ("ready", [1]), "c": ("ready", [0]), "d": ("stopped", [])}
    assert gpus == [(22.0, ["a", "c"]), (14.0, ["b"])]  # what each fake service holds, per the stand-in NVML
    ask(orch, "d")  # fits nowhere: room is made on one GPU only, from its least recently used model
    models_now, gpus = placed(orch)
    assert models_now == {"a": ("parked", [0]), "b": ("ready", [1]), "c": ("ready", [0]), "d": ("ready", [0])}
    assert gpus == [(22.0, ["a", "c", "d"]), (14.0, ["b"])]  # a parked on GPU 0 holds nothing there now
    ask(orch, "a")  # restores onto GPU 0, where its process parked; b on GPU 1 is never touched
    models_now, gpus = placed(orch)
    assert models_now["a"] == ("ready", [0]) and models_now["b"] == ("ready", [1])
    assert {models_now["c"][0], models_now["d"][0]} == {"parked"}
    assert gpus == [(14.0, ["a", "c", "d"]), (14.0, ["b"])]
    assert "swap: parking c, d to restore a" in orch.log() or "swap: parking d, c to restore a" in orch.log()
    gauges = per_gpu_metrics(orch)
    assert gauges["aio_gpu_device_budget_bytes"] == {("0",): 24 * GIB, ("1",): 24 * GIB}
    # a 14 on GPU 0; c and d parked there keep nothing declared (no overhead, no kept graphs); b 14 on 1
    assert gauges["aio_gpu_device_claimed_bytes"] == {("0",): 14 * GIB, ("1",): 14 * GIB}
    assert gauges["aio_gpu_device_used_bytes"] == {("0",): 14 * GIB, ("1",): 14 * GIB}
    assert gauges["aio_model_gpu"] == {("a", "0"): 1, ("b", "1"): 1, ("c", "0"): 1, ("d", "0"): 1}


def per_gpu_metrics(orch: Any) -> dict[str, dict[tuple[str, ...], float]]:
    text = httpx.get(orch.url + "/metrics", headers=orch.admin_headers, timeout=10).text
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("aio_gpu_device_", "aio_model_gpu")):
            for sample in family.samples:
                key = tuple(sample.labels[label] for label in ("model", "gpu") if label in sample.labels)
                found.setdefault(family.name, {})[key] = sample.value
    return found


def test_a_gpu_in_mig_mode_is_refused_before_serving(tmp_path: Path) -> None:
    env = {**os.environ, **fake_driver(tmp_path, H100, {**H100, "mig": True})}
    config = write_config(tmp_path, {"a": fake_model("a")})
    done = subprocess.run([sys.executable, str(ORCHESTRATOR), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "GPU 1 is in MIG mode" in done.stderr and "nvidia-smi -i 1 -mig 0" in done.stderr
    assert "Traceback" not in done.stderr


def whoami(orch: Any, model: str) -> dict[str, str | None]:
    ask(orch, model)
    answer = httpx.get(f"{orch.url}/upstream/{model}/whoami", headers=orch.admin_headers, timeout=10).json()
    return dict(answer["devices"])


def test_a_tensor_parallel_model_spans_two_gpus_and_a_pinned_one_keeps_to_its_own(orchestrator: Any,
                                                                                  tmp_path: Path) -> None:
    env = fake_driver(tmp_path, H100, H100, H100, H100)
    env.update(CUDA_VISIBLE_DEVICES="1,2,3", CUDA_DEVICE_ORDER="PCI_BUS_ID")  # GPU 0 belongs to someone else
    models = {"tp": fake_model("tp", vram_gb=30, tensor_parallel=2), "pin": fake_model("pin", vram_gb=10, gpus=[3]),
              "any": fake_model("any", vram_gb=60)}
    orch = orchestrator(models, env=env, gpu_memory_gb="auto", gpu_process_overhead_gb=0,
                        env_passthrough=["AIO_FAKE_NVML"])
    assert whoami(orch, "pin")["CUDA_VISIBLE_DEVICES"] == "3"
    tp = whoami(orch, "tp")
    # 30 GB on each of two; pack: beside pin on 3 (40 GB left over there, not 50), keeping GPU 2 whole
    assert tp["CUDA_VISIBLE_DEVICES"] == "1,3" and tp["AIO_VRAM_GB"] == "30"
    assert whoami(orch, "any")["CUDA_VISIBLE_DEVICES"] == "2"  # the 60 GB model finds the hole pack kept
    models_now, gpus = placed(orch)
    assert models_now == {"tp": ("ready", [1, 3]), "pin": ("ready", [3]), "any": ("ready", [2])}
    assert gpus == [(30.0, ["tp"]), (60.0, ["any"]), (40.0, ["pin", "tp"])]  # GPU 0 is never listed


def test_flux_configured_over_two_24_gb_gpus_takes_turns_with_qwen(orchestrator: Any, tmp_path: Path) -> None:
    """The GPU profile's shape on 2 x 24 GB: FLUX (36 GB) fits no one card, so its entry spans two."""
    models = {"qwen": fake_model("qwen", vram_gb=22), "minilm": fake_model("minilm", vram_gb=1),
              "flux": fake_model("flux", vram_gb=18, tensor_parallel=2)}
    orch = orchestrator(models, env=fake_driver(tmp_path, RTX4090, RTX4090), gpu_memory_gb="auto",
                        gpu_process_overhead_gb=0, host_memory_gb=100, env_passthrough=["AIO_FAKE_NVML"])
    ask(orch, "qwen")
    ask(orch, "minilm")  # pack: the 2 GB beside qwen
    flux = whoami(orch, "flux")
    assert (flux["CUDA_VISIBLE_DEVICES"], flux["AIO_VRAM_GB"], flux["AIO_TENSOR_PARALLEL"]) == ("0,1", "18", "2")
    models_now, gpus = placed(orch)
    assert models_now == {"qwen": ("parked", [0]), "minilm": ("ready", [0]), "flux": ("ready", [0, 1])}
    assert gpus == [(19.0, ["flux", "minilm", "qwen"]), (18.0, ["flux"])]
    ask(orch, "qwen")  # back where it parked; flux must leave both cards
    models_now, gpus = placed(orch)
    assert models_now["qwen"] == ("ready", [0]) and models_now["flux"][0] == "parked"
    assert gpus[1] == (0.0, ["flux"])  # flux parked: its process stays on both, holding nothing


PROFILE = REPO / "model-orchestrator" / "models.yaml"
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    "embedding": ("/v1/embeddings", {"input": "hi"}), "audio": ("/v1/audio/speech", {"input": "hi"}),
    "image": ("/v1/images/generations", {"prompt": "a cat"}), "rerank": ("/v1/rerank", {"query": "q",
                                                                                       "documents": ["d"]})}


def test_the_gpu_profiles_models_on_two_24_gb_gpus(orchestrator: Any, tmp_path: Path) -> None:
    """The GPU profile's models (names, types, shares, what a parked Qwen keeps), each played by the fake
    service, on a pretend 2 x 24 GB pod with FLUX configured over both cards. No GPU is ever over its
    budget, and each swap parks only models on the GPUs that need the room."""
    profile = yaml.safe_load(PROFILE.read_text())["models"]
    models = {name: fake_model(name, type=spec["type"], vram_gb=spec["vram_gb"],
                               park={"vram_kept_gb": spec.get("park", {}).get("vram_kept_gb", 0)})
              for name, spec in profile.items() if name != "echo"}
    models["flux.1-schnell"].update(vram_gb=18, tensor_parallel=2)  # 36 GB fits no one 24 GB card
    orch = orchestrator(models, env=fake_driver(tmp_path, RTX4090, RTX4090), gpu_memory_gb="auto",
                        gpu_process_overhead_gb=0.5, host_memory_gb=100, env_passthrough=["AIO_FAKE_NVML"])

    def use(name: str) -> dict[str, tuple[str, list[int]]]:
        path, body = ROUTES[profile[name]["type"]]
        reply = httpx.post(orch.url + path, json={"model": name, **body}, headers=orch.admin_headers, timeout=60)
        assert reply.status_code == 200, reply.text
        gauges = per_gpu_metrics(orch)
        for gpu, claimed in gauges["aio_gpu_device_claimed_bytes"].items():
            assert claimed <= gauges["aio_gpu_device_budget_bytes"][gpu], (name, gauges)
        return placed(orch)[0]

    qwen, minilm, musicgen, flux = "qwen2.5-7b-instruct", "all-minilm-l6-v2", "musicgen-medium", "flux.1-schnell"
    rerank = "bge-reranker-v2-m3"
    assert use(qwen)[qwen] == ("ready", [0])
    assert use(minilm)[minilm] == ("ready", [0])  # pack: the 1.5 GB left beside Qwen (22 + 0.5)
    assert use(musicgen)[musicgen] == ("ready", [1])  # fits no longer on GPU 0: GPU 1, nothing evicted
    states = use(flux)  # 18.5 GB on each card: Qwen parks from GPU 0, MusicGen from GPU 1; MiniLM stays
    assert states == {qwen: ("parked", [0]), minilm: ("ready", [0]), musicgen: ("parked", [1]),
                      flux: ("ready", [0, 1]), rerank: ("stopped", []), "whisper-large-v3-turbo": ("stopped", [])}
    # 3.5 GB: 2.5 left on GPU 0 (FLUX, MiniLM, parked Qwen's 1.5), 5 on GPU 1 (FLUX, parked MusicGen's 0.5)
    assert use(rerank)[rerank] == ("ready", [1])
    states = use(qwen)  # restores onto GPU 0: MiniLM and FLUX (on both) make room; GPU 1's are not touched
    assert states[qwen] == ("ready", [0]) and states[musicgen] == ("parked", [1]) and states[rerank] == ("ready", [1])
    assert states[flux][0] == "parked" and states[minilm][0] == "parked"


def test_memory_other_processes_hold_steers_placement(orchestrator: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A program outside the orchestrator (here a sleeping Python the stand-in charges 16 GB of GPU 0) is
    seen per GPU: a model that would pack onto GPU 0 goes to GPU 1, a small one still fits beside it, and
    once the program exits the GPU is clear again."""
    env = fake_driver(tmp_path, RTX4090, RTX4090)
    monkeypatch.setenv("AIO_FAKE_NVML", env["AIO_FAKE_NVML"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stand_in_nvml.load().claim(other.pid, {0: 16 * GIB})
        models = {"a": fake_model("a", vram_gb=10), "b": fake_model("b", vram_gb=6)}
        orch = orchestrator(models, env=env, gpu_memory_gb="auto", gpu_process_overhead_gb=0,
                            env_passthrough=["AIO_FAKE_NVML"])
        assert others(orch) == [16.0, 0.0]
        ask(orch, "a")  # both GPUs are empty of models; pack would take GPU 0, where only 8 GB are left
        ask(orch, "b")  # 6 GB: the tightest fit is beside the other program (2 GB over, against 8 on GPU 1)
        assert placed(orch) == ({"a": ("ready", [1]), "b": ("ready", [0])}, [(22.0, ["b"]), (10.0, ["a"])])
        assert per_gpu_metrics(orch)["aio_gpu_device_others_bytes"] == {("0",): 16 * GIB, ("1",): 0.0}
    finally:
        other.kill()
        other.wait()
    assert wait_until(lambda: others(orch) == [0.0, 0.0], timeout=15), others(orch)
    assert "GPU memory held by other processes: GPU 0 16.0 GB" in orch.log()


def others(orch: Any) -> list[float]:
    status = httpx.get(orch.url + "/status", headers=orch.admin_headers, timeout=10).json()
    return [g["others_gb"] for g in status["gpus"]]

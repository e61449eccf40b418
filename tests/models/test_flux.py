"""The flux service as a real process with a tiny random-weight FluxPipeline, over HTTP.

A client that hangs up mid-render: tests/models/test_worker_cancel.py.
"""

from __future__ import annotations

import base64
import io
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import health_status, running_service, wait_until
from tests.models.hf_cache import hub_snapshot

pytest.importorskip("diffusers")

from PIL import Image  # after the skip: pillow comes with the image stack

pytestmark = pytest.mark.integration

SCRIPT = "models/flux/server.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.flux import tiny as builder

    return builder.build(tmp_path_factory.mktemp("flux-tiny"))


@pytest.fixture(scope="module")
def service(tiny: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with running_service(SCRIPT, "--model", str(tiny), "--default-steps", "2") as running:
        yield running


@pytest.fixture(scope="module")
def url(service: tuple[subprocess.Popen[bytes], str]) -> str:
    return service[1]


def post(url: str, timeout: float = 120, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", json=body, timeout=timeout)


def generate(url: str, **body: Any) -> list[bytes]:
    response = post(url, **{"prompt": "a tiny red fox", "size": "64x64", **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert isinstance(payload["created"], int)
    return [base64.b64decode(item["b64_json"]) for item in payload["data"]]


def image(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png))


def assert_error(response: httpx.Response, param: str | None, status: int = 400) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    return str(error["message"])


def test_64x64_png(url: str) -> None:
    started = time.monotonic()
    (png,) = generate(url, model="flux", quality="hd", style="vivid", user="someone")
    elapsed = time.monotonic() - started
    decoded = image(png)
    assert decoded.format == "PNG"
    assert decoded.size == (64, 64)
    print(f"64x64, 2 steps: {elapsed:.3f}s over HTTP")


def test_seed_is_deterministic(url: str) -> None:
    first, again = generate(url, seed=7), generate(url, seed=7)
    other = generate(url, seed=8)
    assert first == again
    assert image(first[0]).tobytes() != image(other[0]).tobytes()


def test_n_images(url: str) -> None:
    # The VAE decodes them one by one (slicing) and in tiles (the tiny VAE tiles from 33 px up).
    pngs = generate(url, n=2, seed=1)
    assert len(pngs) == 2
    assert all(image(png).size == (64, 64) for png in pngs)
    assert image(pngs[0]).tobytes() != image(pngs[1]).tobytes()
    assert generate(url, n=2, seed=1) == pngs


def test_vae_decodes_in_slices_and_tiles(tiny: Path) -> None:
    # Loaded in this process, as the service loads it: filterwarnings=error turns any deprecated
    # switch into a failure here.
    from models.flux.server import FluxService

    flux = FluxService()
    flux.options = flux.argument_parser().parse_args(["--model", str(tiny), "--device", "cpu"])
    flux.model_path = str(tiny)
    vae = flux._load_pipeline().vae
    assert vae.use_slicing and vae.use_tiling
    assert vae.tile_latent_min_size < 64  # so the 64x64 requests above run the tiled decode


def test_non_square_is_width_by_height(url: str) -> None:
    (png,) = generate(url, size="64x128", num_inference_steps=1)
    assert image(png).size == (64, 128)


def test_openai_client(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="flux", prompt="a lighthouse", response_format="b64_json",
                                    extra_body={"size": "64x64", "seed": 3, "num_inference_steps": 1})
    assert result.data is not None
    assert image(base64.b64decode(result.data[0].b64_json or "")).size == (64, 64)


@pytest.mark.parametrize(("body", "param"), [
    ({"size": "10x10"}, "size"),
    ({"size": "64"}, "size"),
    ({"size": "0x64"}, "size"),
    ({"size": "2048x64"}, "size"),
    ({"response_format": "url"}, "response_format"),
    ({"response_format": "png"}, "response_format"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 51}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": "lucky"}, "seed"),
])
def test_bad_requests(url: str, body: dict[str, Any], param: str) -> None:
    message = assert_error(post(url, **{"prompt": "a fox", "size": "64x64", **body}), param)
    if param == "size":
        assert "multiple of 16" in message and "1536" in message
    if body.get("response_format") == "url":
        assert "b64_json" in message


def post_raw(url: str, content: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/images/generations", content=content, timeout=10,
                      headers={"content-type": "application/json"})


def test_missing_prompt_and_bad_json(url: str) -> None:
    assert_error(post(url, size="64x64"), "prompt")
    assert post_raw(url, b"{not json").status_code == 400
    # Python's json module (and so FastAPI) reads Infinity and NaN; they are no guidance values.
    for value in (b"Infinity", b"NaN"):
        assert_error(post_raw(url, b'{"prompt": "a fox", "guidance_scale": %s}' % value), "guidance_scale")


def test_still_healthy_after_bad_requests(url: str) -> None:
    bad: list[dict[str, Any]] = [{"size": "1x1"}, {"n": 0}, {"prompt": ""}, {"response_format": "url"}]
    for body in bad:
        assert post(url, **{"prompt": "a fox", **body}).status_code == 400
    assert health_status(url) == 200
    assert image(generate(url, seed=2)[0]).size == (64, 64)


def test_health_answers_while_rendering(url: str) -> None:
    finished: list[float] = []

    def slow() -> None:
        generate(url, size="192x192", num_inference_steps=8, seed=4)  # ~1-8 s on 2 busy cores
        finished.append(time.monotonic())

    worker = threading.Thread(target=slow)
    worker.start()
    latencies: list[tuple[float, float]] = []  # (answered at, seconds taken)
    while worker.is_alive():
        began = time.monotonic()
        assert health_status(url) == 200
        latencies.append((time.monotonic(), time.monotonic() - began))
        time.sleep(0.05)
    worker.join()
    assert finished, "the slow generation failed"
    during = [took for answered, took in latencies if answered < finished[0]]
    assert len(during) >= 2, f"the generation was too quick to overlap health checks: {latencies}"
    assert max(during) < 1.0, latencies


def test_cuda_only_options_are_ignored_on_cpu(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _cuda_available():
        pytest.skip("CUDA present: offload and the GPU share would really be used")
    monkeypatch.setenv("AIO_VRAM_GB", "36")  # as the orchestrator sets it from vram_gb
    with running_service(SCRIPT, "--model", str(tiny), "--offload", "model", "--default-steps", "1") as (proc, url):
        assert image(generate(url)[0]).size == (64, 64)
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        log = proc.stdout.read().decode()
    assert "needs CUDA" in log
    assert "GPU share 36 GiB not applied: the model runs on cpu" in log


def test_hub_id_from_the_hf_cache_offline(url: str, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    # The GPU profile passes the hub id and HF_HUB_OFFLINE=1; the playbook filled HF_HOME with the
    # diffusers folders only (model_index.json and the component folders, no single-file weights).
    hf_home = tmp_path / "hf"
    hub_snapshot(hf_home, "black-forest-labs/FLUX.1-schnell", tiny)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    args = ("--model", "black-forest-labs/FLUX.1-schnell", "--default-steps", "1")
    with running_service(SCRIPT, *args) as (_, hub_url):
        assert httpx.get(hub_url + "/health", timeout=10).json()["model"] == "black-forest-labs/FLUX.1-schnell"
        from_hub = generate(hub_url, seed=9, num_inference_steps=1)
    assert image(from_hub[0]).size == (64, 64)
    assert from_hub == generate(url, seed=9, num_inference_steps=1)  # the same weights as the local folder


def test_cuda_requested_without_cuda_fails(tiny: Path) -> None:
    if _cuda_available():
        pytest.skip("CUDA present")
    with running_service(SCRIPT, "--model", str(tiny), "--device", "cuda", wait_ready=False) as (proc, _):
        assert wait_until(lambda: proc.poll() is not None, 60)
        assert proc.returncode != 0


@pytest.mark.gpu
def test_tiny_model_on_cuda(tiny: Path) -> None:
    args = ("--model", str(tiny), "--device", "cuda", "--dtype", "bfloat16", "--default-steps", "2")
    with running_service(SCRIPT, *args) as (_, url):
        (png,) = generate(url, seed=1)
        assert image(png).size == (64, 64)
        assert generate(url, seed=1) == [png]


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_two_gpus_spread_the_pipeline_with_a_share_on_each(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, tiny: Path) -> None:
    """models.yaml's tensor_parallel: 2 reaches FLUX as AIO_TENSOR_PARALLEL: diffusers' device map over
    two GPUs, each held to vram_gb. On CPU the same load runs as one device, and parks as before."""
    from models.flux.server import FluxService, split_kwargs

    assert split_kwargs(2, "cuda", 18) == {"device_map": "balanced", "max_memory": {0: "18GiB", 1: "18GiB"}}
    assert split_kwargs(2, "cuda", None) == {"device_map": "balanced"}
    assert split_kwargs(1, "cuda", 18) == {}
    with caplog.at_level("WARNING", logger="models.flux.server"):
        assert split_kwargs(2, "cpu", 18) == {}
    assert "--gpus 2 needs CUDA" in caplog.text
    monkeypatch.setenv("AIO_TENSOR_PARALLEL", "2")
    flux = FluxService()
    flux.options = flux.argument_parser().parse_args(["--model", str(tiny), "--device", "cpu"])
    assert flux.options.gpus == 2
    flux.model_path = str(tiny)
    flux.pipeline = flux._load_pipeline()
    assert flux.spread is False and flux.weights is not None and flux.park_unsupported() is None


@pytest.mark.gpu
def test_tiny_model_spread_over_two_gpus(tiny: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    args = ("--model", str(tiny), "--device", "cuda", "--dtype", "bfloat16", "--default-steps", "2", "--gpus", "2")
    with running_service(SCRIPT, *args) as (_, url):
        (png,) = generate(url, seed=1)
        assert image(png).size == (64, 64)
        state = httpx.post(url + "/offload", timeout=30)  # no service token: started outside an orchestrator
        assert state.status_code == 501 and "over 2 GPUs" in state.json()["error"]["message"]

"""The shipped CPU demo profile through the orchestrator, with the official openai client.

Runs model-orchestrator/models.demo.yaml as shipped, except for free ports and a temporary
log folder: tiny text/image/music models and the real MiniLM embeddings model, swapped in
and out of a pretend 4 GB GPU budget.
"""

from __future__ import annotations

import base64
import io
import wave
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import REPO, Orchestrator, free_port, start_orchestrator, stop_orchestrator

pytest.importorskip("diffusers")
pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def orch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    from models.build_tiny import DEFAULT_OUT, build_all

    build_all(DEFAULT_OUT)  # what install.sh does; a no-op when they are already built
    config = yaml.safe_load((REPO / "model-orchestrator" / "models.demo.yaml").read_text())
    workdir = tmp_path_factory.mktemp("demo")
    config["settings"].update(port=free_port(), log_dir=str(workdir / "logs"), base_dir=str(REPO))
    for spec in config["models"].values():
        spec["port"] = free_port()
    path = workdir / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    running = start_orchestrator(path, workdir / "orchestrator.log")
    yield running
    stop_orchestrator(running)


@pytest.fixture(scope="module")
def client(orch: Orchestrator) -> openai.OpenAI:
    return openai.OpenAI(base_url=orch.url + "/v1", api_key="demo", max_retries=0, timeout=300)


def test_models_list(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list().data} == {"tiny-qwen", "tiny-flux", "tiny-musicgen", "all-minilm",
                                                         "tiny-rerank", "tiny-whisper", "echo"}


def test_chat_and_stream(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0)
    assert reply.model == "tiny-qwen" and reply.usage is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny-qwen", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, stream=True, temperature=0)
    chunks = [c for c in stream if c.choices]
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_image(client: openai.OpenAI) -> None:
    from PIL import Image

    result = client.images.generate(model="tiny-flux", prompt="a red fox", size="64x64",
                                    response_format="b64_json")
    assert result.data is not None and result.data[0].b64_json is not None
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 64)


def test_music(client: openai.OpenAI) -> None:
    audio = client.audio.speech.create(model="tiny-musicgen", voice="alloy", input="calm piano",
                                       response_format="wav", extra_body={"duration": 1.0})
    with wave.open(io.BytesIO(audio.content)) as wav:
        assert abs(wav.getnframes() / wav.getframerate() - 1.0) < 0.1


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="text-embedding-3-small",
                                      input=["A man is eating food.", "A man eats a piece of bread.",
                                             "The movie is about aliens."])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert _dot(vectors[0], vectors[1]) > _dot(vectors[0], vectors[2])


def test_three_generators_do_not_fit_so_one_was_evicted(client: openai.OpenAI, orch: Orchestrator) -> None:
    for call in (test_chat_and_stream, test_image, test_music):  # all three, in this order
        call(client)
    status = orch.status()
    states = {name: entry["state"] for name, entry in status.items()}
    loaded = [m for m in ("tiny-qwen", "tiny-flux", "tiny-musicgen") if states[m] == "ready"]
    assert loaded == ["tiny-flux", "tiny-musicgen"], states  # 3 x 1.5 GB > 4 GB: the LRU one went
    held = sum(entry["vram_gb"] for entry in status.values() if entry["state"] == "ready")
    assert held <= 4, states  # the budget is never exceeded


def test_an_evicted_image_model_is_parked_and_renders_the_same_after_restore(
        client: openai.OpenAI, orch: Orchestrator) -> None:
    def render() -> str:
        result = client.images.generate(model="tiny-flux", prompt="a red fox", size="64x64",
                                        response_format="b64_json", extra_body={"seed": 11})
        assert result.data is not None and result.data[0].b64_json is not None
        return result.data[0].b64_json

    before = render()
    pid = orch.status()["tiny-flux"]["pid"]
    test_music(client)
    test_chat_and_stream(client)  # 3 x 1.5 GB > 4 GB: flux, the least recently used, makes room
    status = orch.status()
    assert status["tiny-flux"]["state"] == "parked" and status["tiny-flux"]["pid"] == pid, status["tiny-flux"]
    assert status["tiny-flux"]["park"]["host_gb"] > 0  # its weights wait in host memory
    assert render() == before  # restored, same process, same pixels
    status = orch.status()
    assert status["tiny-flux"]["pid"] == pid and status["tiny-flux"]["park"]["restores"] >= 1
    test_music(client)  # musicgen (parked to make room for flux) back: tiny-qwen, now the LRU one, makes room
    states = {name: entry["state"] for name, entry in orch.status().items()}
    assert [states[m] for m in ("tiny-qwen", "tiny-flux", "tiny-musicgen")] == ["parked", "ready", "ready"], states


def test_metrics_show_every_family_after_the_demo_served(client: openai.OpenAI, orch: Orchestrator) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    test_embeddings(client)
    text = httpx.get(orch.url + "/metrics", timeout=30).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    expected = {  # docs/observability.md; NVML's measured memory is absent without a GPU
        "aio_requests", "aio_e2e_request_latency_seconds", "aio_time_to_first_byte_seconds", "aio_queue_wait_seconds",
        "aio_prompt_tokens", "aio_generation_tokens", "aio_swaps", "aio_model_transition_seconds", "aio_model_state",
        "aio_requests_in_flight", "aio_requests_waiting", "aio_model_restarts", "aio_model_failures",
        "aio_model_parks", "aio_model_restores", "aio_model_park_failures", "aio_gpu_memory_declared_bytes",
        "aio_host_memory_parked_bytes", "aio_gpu_budget_bytes", "aio_host_budget_bytes"}
    assert expected <= set(families), expected - set(families)
    models = {s.labels["model"] for s in families["aio_requests"].samples}
    assert {"tiny-qwen", "tiny-flux", "tiny-musicgen", "all-minilm"} <= models
    parks = {s.labels["model"]: s.value for s in families["aio_model_parks"].samples}
    assert parks["tiny-flux"] >= 1  # the eviction test above parked it


def test_rerank_by_alias_and_by_default(client: openai.OpenAI, orch: Orchestrator) -> None:
    """Rerank has no method in the openai client; its low-level post sends it the way an SDK would. Runs
    after the eviction tests: making room for it may evict one more model."""
    body: dict[str, Any] = {"model": "rerank", "query": "where does the cat sit", "top_n": 2,
            "documents": ["the cat sits on the mat", "paris is the capital of france", {"text": "a dog"}]}
    answer = client.post("/rerank", body=body, cast_to=httpx.Response).json()
    assert answer["model"] == "tiny-rerank" and len(answer["results"]) == 2
    assert answer["results"][0]["relevance_score"] >= answer["results"][1]["relevance_score"]
    assert answer["results"][0]["document"] in ({"text": body["documents"][0]}, {"text": body["documents"][1]},
                                                body["documents"][2])
    default = httpx.post(orch.url + "/rerank", json={k: v for k, v in body.items() if k != "model"}, timeout=60)
    assert default.status_code == 200 and default.json()["results"] == answer["results"]
    with pytest.raises(openai.NotFoundError, match="is an embedding model and does not serve /v1/rerank"):
        client.post("/rerank", body={**body, "model": "all-minilm"}, cast_to=httpx.Response)


def test_langchain_tools_and_structured_output_on_the_demo_text_model(orch: Orchestrator) -> None:
    """The demo's tiny-qwen runs the transformers engine: its grammar holds the random weights to the schema."""
    from langchain_openai import ChatOpenAI

    from tests.models.test_text_structured import Forecast

    chat = ChatOpenAI(model="gpt-4o-mini", base_url=orch.url + "/v1", api_key="demo", max_tokens=200,
                      max_retries=0)

    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # an enum: random weights never end a free string
        """The weather in a city."""
        return "sunny"

    called = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert [call["name"] for call in called.tool_calls] == ["get_weather"]
    assert isinstance(chat.with_structured_output(Forecast, method="json_schema").invoke("Rome?"), Forecast)


def test_a_transcription_through_the_orchestrator(client: openai.OpenAI) -> None:
    """The form's model field routes it (an alias here, after the file in the client's encoding)."""
    from tests.models.test_whisper import tone

    heard = client.audio.transcriptions.create(model="whisper-1", file=("tone.wav", tone(2.0)),
                                               response_format="verbose_json", timestamp_granularities=["word"])
    assert heard.duration == pytest.approx(2.0, abs=0.01) and heard.words is not None
    subtitles = client.audio.transcriptions.create(model="tiny-whisper", file=("tone.wav", tone(1.0)),
                                                   response_format="srt")
    assert isinstance(subtitles, str)


def test_unknown_model_is_a_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))

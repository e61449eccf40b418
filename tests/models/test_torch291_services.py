"""The image, music, embedding, rerank and speech-to-text services on the torch 2.9.1 stack's libraries
(the design's image).

On a pod whose image has torch 2.9.1, the services run on models/requirements-services-torch291.txt:
transformers 4.57, diffusers 0.39, sentence-transformers 5.7 and huggingface-hub 0.36, because
vLLM 0.16 (the release built for that torch) needs transformers 4. CI cannot install that torch's
CUDA build (about 5 GB), so the libraries run here over the CPU torch 2.13 of the test environment,
the way the pod's environment sits over the image's torch: a new environment sees the test
environment's packages through a ``.pth`` file, and its own (the 4.x set, resolved from that
file without torch) come first. The tiny models are built by the test environment's transformers
5, as real checkpoints are saved by whatever release their authors had. What vLLM 0.16 itself
needs is checked from its source: tests/unit/test_vllm_surface.py.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.integration.conftest import running_service

pytest.importorskip("diffusers")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "models" / "requirements-services-torch291.txt"
# Already in the test environment, which plays the image: never installed a second time.
FROM_THE_IMAGE = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)==", re.IGNORECASE)
EXPECTED = {"transformers": "4.57.6", "diffusers": "0.39.0", "sentence-transformers": "5.7.0"}


@pytest.fixture(scope="module")
def stack_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An environment with the torch 2.9.1 stack's service libraries over the test environment's torch."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv comes with the test extras (pyproject.toml)"
    root = tmp_path_factory.mktemp("torch291-services")
    venv = root / "venv"
    run(uv, "venv", "--quiet", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after its own packages
    pins = run(uv, "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--python", str(python),
               str(REQUIREMENTS))
    wanted = [line for line in pins.splitlines() if line and not FROM_THE_IMAGE.match(line)]
    (root / "pins.txt").write_text("\n".join(wanted) + "\n")
    run(uv, "pip", "install", "--quiet", "--no-deps", "--compile-bytecode", "--python", str(python),
        "-r", str(root / "pins.txt"))
    return python


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.flux import tiny as flux
    from models.musicgen import tiny as musicgen

    root = tmp_path_factory.mktemp("tiny")
    return {"image": flux.build(root / "image"), "music": musicgen.build(root / "music")}


def test_the_environment_has_the_stacks_libraries_over_the_image_torch(stack_python: Path) -> None:
    probe = ("import importlib.metadata as m, torch; "
             "print(torch.__file__); print(*(m.version(n) for n in ('transformers', 'diffusers', "
             "'sentence-transformers')))")
    torch_file, versions = run(str(stack_python), "-c", probe).strip().splitlines()
    assert torch_file.startswith(sysconfig.get_paths()["purelib"])  # the "image's" torch, not one of its own
    assert versions.split() == list(EXPECTED.values())


def test_flux_answers_in_bfloat16_on_diffusers_039(stack_python: Path, tiny: dict[str, Path]) -> None:
    # diffusers 0.39 ignores dtype= (float32, silently): the service passes torch_dtype= there, and
    # refuses a pipeline loaded in another dtype than asked for, so an answer means bfloat16
    with running_service("models/flux/server.py", "--model", str(tiny["image"]), "--default-steps", "2",
                         "--dtype", "bfloat16", python=str(stack_python)) as (_, url):
        image = OpenAI(base_url=url + "/v1", api_key="unused").images.generate(
            model="flux", prompt="a tiny red fox", size="64x64", response_format="b64_json")
    from PIL import Image

    assert image.data and image.data[0].b64_json
    assert Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json))).size == (64, 64)


def test_musicgen_answers_with_audio(stack_python: Path, tiny: dict[str, Path]) -> None:
    with running_service("models/musicgen/server.py", "--model", str(tiny["music"]),
                         python=str(stack_python)) as (_, url):
        audio = OpenAI(base_url=url + "/v1", api_key="unused").audio.speech.create(
            model="musicgen", voice="alloy", input="a calm piano", extra_body={"duration": 1})
    wav = audio.content
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE" and len(wav) > 1000


def test_rerank_answers_on_sentence_transformers_57(stack_python: Path, tmp_path: Path) -> None:
    from models.rerank import tiny as builder

    model = builder.build(tmp_path / "rerank")
    with running_service("models/rerank/server.py", "--model", str(model), "--max-length", "8",
                         python=str(stack_python)) as (_, url):
        body = {"query": "where does the cat sit", "documents": ["the cat sits on the mat", "paris"], "top_n": 1}
        reply = OpenAI(base_url=url + "/v1", api_key="unused").post("/rerank", body=body, cast_to=httpx.Response)
        answer = reply.json()
    assert len(answer["results"]) == 1 and 0 < answer["results"][0]["relevance_score"] < 1
    assert answer["usage"]["total_tokens"] == 2 * 8  # each pair (over 8 tokens) cut at --max-length 8


def test_whisper_transcribes_on_transformers_457(stack_python: Path, tmp_path: Path) -> None:
    from models.whisper import tiny as builder
    from tests.models.test_whisper import tone

    model = builder.build(tmp_path / "whisper")
    with running_service("models/whisper/server.py", "--model", str(model), "--max-new-tokens", "16",
                         python=str(stack_python)) as (_, url):
        heard = OpenAI(base_url=url + "/v1", api_key="unused").audio.transcriptions.create(
            model="whisper-1", file=("tone.wav", tone(2.0)), response_format="verbose_json",
            timestamp_granularities=["segment", "word"])
    assert heard.duration == pytest.approx(2.0, abs=0.01) and heard.segments and heard.words is not None


def test_embeddings_answer_on_sentence_transformers_57(stack_python: Path) -> None:
    with running_service("models/embeddings/server.py", python=str(stack_python)) as (_, url):
        reply = OpenAI(base_url=url + "/v1", api_key="unused").embeddings.create(
            model="embeddings", input=["a cat sits", "a cat is sitting"])
    first, second = (item.embedding for item in reply.data)
    assert len(first) == 384 and abs(sum(x * x for x in first) - 1) < 1e-3  # all-MiniLM-L6-v2, normalised
    assert sum(a * b for a, b in zip(first, second, strict=True)) > 0.8

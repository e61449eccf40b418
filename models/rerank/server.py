"""rerank: ``/v1/rerank`` (also ``/rerank`` and ``/v2/rerank``) in the Cohere/Jina shape, on any
sentence-transformers ``CrossEncoder``.

The GPU profile serves BAAI/bge-reranker-v2-m3 (XLM-RoBERTa, 568M parameters, 8192 tokens); the
demo and CI a tiny random-weight model of the same architecture (``python -m models.rerank.tiny``).
torch and sentence-transformers are imported in ``load()``.

    python models/rerank/server.py --port 8005 --model PATH_OR_HUB_ID [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict

from core.common.errors import bad_request
from core.runtime.single_model import SingleModelService
from core.runtime.worker import JobContext

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

log = logging.getLogger(__name__)

HUB_MODEL = "BAAI/bge-reranker-v2-m3"
ROUTES = ("/v1/rerank", "/rerank", "/v2/rerank")  # OpenAI-style, Jina/vLLM, Cohere v2


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # max_chunks_per_doc, rank_fields, ...: accepted and ignored
    query: Any = None
    documents: Any = None
    model: str | None = None
    top_n: Any = None
    return_documents: Any = True


def document_texts(documents: Any, max_documents: int, max_chars: int) -> list[str]:
    """The texts of ``documents`` (strings, or objects with a ``text``), or a 400 naming the one at fault."""
    if not isinstance(documents, list) or not documents:
        raise bad_request("'documents' must be a non-empty list of strings or of objects with a 'text'.",
                          "documents")
    if len(documents) > max_documents:
        raise bad_request(f"'documents' has {len(documents)} items; at most {max_documents} are allowed.",
                          "documents")
    texts = []
    for i, document in enumerate(documents):
        text = document.get("text") if isinstance(document, dict) else document
        if not isinstance(text, str):
            raise bad_request(f"'documents[{i}]' must be a string or an object with a string 'text'.", "documents")
        if len(text) > max_chars:
            raise bad_request(f"'documents[{i}]' has {len(text)} characters; at most {max_chars} are allowed.",
                              "documents")
        texts.append(text)
    return texts


def checked_query(query: Any, max_chars: int) -> str:
    if not isinstance(query, str) or not query:
        raise bad_request("'query' must be a non-empty string.", "query")
    if len(query) > max_chars:
        raise bad_request(f"'query' has {len(query)} characters; at most {max_chars} are allowed.", "query")
    return query


def checked_top_n(top_n: Any) -> int | None:
    """How many results to return: None (or 0, as vLLM reads it) for all."""
    if top_n is None:
        return None
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise bad_request("'top_n' must be a whole number, 1 or more (0 or absent: every document).", "top_n")
    return top_n or None


def ranked(scores: list[float], documents: list[Any], top_n: int | None, return_documents: bool
           ) -> list[dict[str, Any]]:
    """The results, best first (ties in the documents' order), ``top_n`` of them."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top_n]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            document = documents[i]
            result["document"] = document if isinstance(document, dict) else {"text": document}
        results.append(result)
    return results


class RerankService(SingleModelService):
    name = "rerank"
    engine_modules = ("torch", "sentence_transformers")
    default_port = 8005
    model: CrossEncoder

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)  # --device
        parser.add_argument("--max-documents", type=int, default=1000, help="most documents in one request")
        parser.add_argument("--max-input-chars", type=int, default=100_000,
                            help="most characters in the query and in each document")
        parser.add_argument("--batch-size", type=int, default=32, help="query-document pairs per forward pass")
        parser.add_argument("--max-length", type=int, help="tokens of each query-document pair the model reads; "
                            "the rest is cut (default: the model's window, 8192 for bge-reranker-v2-m3)")
        parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                            help="weights' type (auto: as saved; float16 halves a float32 checkpoint on a GPU)")

    async def load(self) -> None:
        started = time.monotonic()
        self.model_path = self.model_path or HUB_MODEL
        self.model = await self.worker.run(self.load_model, label="load")
        log.info("%s: loaded %s on %s in %.1fs", self.name, self.model_path, self.model.device,
                 time.monotonic() - started)

    def build(self, device: str) -> CrossEncoder:
        from sentence_transformers import CrossEncoder

        dtype = None if self.options.dtype == "auto" else self.options.dtype
        model = CrossEncoder(str(self.model_path), device=device, max_length=self.options.max_length,
                             model_kwargs={"dtype": dtype} if dtype else None)
        model.eval()
        return model

    async def warmup(self) -> None:
        await self.worker.run(self.score, "warm up", ["warm up"], label="warm-up")

    def add_routes(self, app: FastAPI) -> None:
        async def rerank(request: RerankRequest) -> Response:
            query = checked_query(request.query, self.options.max_input_chars)
            texts = document_texts(request.documents, self.options.max_documents, self.options.max_input_chars)
            top_n = checked_top_n(request.top_n)
            if not isinstance(request.return_documents, bool):
                raise bad_request("'return_documents' must be true or false.", "return_documents")
            scores, tokens = await self.worker.run(self.score, query, texts, label="rerank")
            body = {"id": f"rerank-{uuid.uuid4().hex}", "model": request.model or self.name,
                    "results": ranked(scores, request.documents, top_n, request.return_documents),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            return Response(json.dumps(body), media_type="application/json")

        for route in ROUTES:
            app.post(route)(rerank)

    def score(self, ctx: JobContext, query: str, texts: list[str]) -> tuple[list[float], int]:
        """Runs in the worker thread: each document's relevance (the model's own activation: a sigmoid
        for one-label rerankers, so 0 to 1), and the tokens the model saw.

        predict() has no callback between its batches, but each batch's forward pass calls the
        model's first module: a hook there stops a cancelled job before its next batch."""
        pairs = [(query, text) for text in texts]
        hook = next(self.model.children()).register_forward_pre_hook(lambda module, args: ctx.check())
        try:
            scores = self.model.predict(pairs, batch_size=self.options.batch_size, show_progress_bar=False,
                                        convert_to_numpy=True)
        finally:
            hook.remove()
        return [float(s) for s in scores], self.count_tokens(pairs)

    def count_tokens(self, pairs: list[tuple[str, str]]) -> int:
        """Tokens the model saw (special tokens in, padding out, cut at its window), from its own tokenizer
        (the one attribute sentence-transformers 5, on the torch 2.9.1 stack, and 6 share)."""
        tokenizer = self.model.tokenizer
        window = self.options.max_length or tokenizer.model_max_length
        encoded = tokenizer([query for query, _ in pairs], [text for _, text in pairs], truncation=True,
                            max_length=window)
        return sum(len(ids) for ids in encoded["input_ids"])


__all__ = ["RerankRequest", "RerankService", "document_texts", "ranked"]

if __name__ == "__main__":
    RerankService().run()

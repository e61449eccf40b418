"""The rerank service as a real process with a tiny random-weight XLM-R cross-encoder (built locally
like BAAI/bge-reranker-v2-m3), over HTTP: the Cohere/Jina shape at its three routes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import REPO, running_service

pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.integration

QUERY = "where does the cat sit"
DOCUMENTS = ["the cat sits on the mat", "paris is the capital of france", "a dog in the city", "gpu model music"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.rerank import tiny

    return tiny.build(tmp_path_factory.mktemp("rerank-tiny"))


@pytest.fixture(scope="module")
def url(model: Path) -> Iterator[str]:
    with running_service("models/rerank/server.py", "--model", str(model), "--batch-size", "2") as (_, base):
        yield base


def rerank(url: str, route: str = "/v1/rerank", **body: Any) -> dict[str, Any]:
    response = httpx.post(url + route, json={"query": QUERY, "documents": DOCUMENTS, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_every_document_scored_best_first_with_the_cross_encoders_own_scores(url: str, model: Path) -> None:
    from sentence_transformers import CrossEncoder

    answer = rerank(url, model="bge")
    assert answer["model"] == "bge" and answer["id"].startswith("rerank-")
    results = answer["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)  # a sigmoid of one logit
    expected = CrossEncoder(str(model), device="cpu").predict([(QUERY, d) for d in DOCUMENTS])
    assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(dict(enumerate(expected.tolist())))
    assert [r["document"] for r in results] == [{"text": DOCUMENTS[r["index"]]} for r in results]


def test_top_n_return_documents_and_object_documents(url: str) -> None:
    best = rerank(url)["results"]
    top = rerank(url, top_n=2, return_documents=False)["results"]
    assert top == [{"index": r["index"], "relevance_score": r["relevance_score"]} for r in best[:2]]
    assert len(rerank(url, top_n=0)["results"]) == 4 and len(rerank(url, top_n=9)["results"]) == 4
    objects = [{"text": text, "id": f"doc-{i}"} for i, text in enumerate(DOCUMENTS)]
    answer = rerank(url, documents=objects)["results"]
    assert [r["document"] for r in answer] == [objects[r["index"]] for r in answer]  # as sent, fields kept


def test_the_three_routes_agree_and_usage_counts_tokens(url: str) -> None:
    answers = [rerank(url, route) for route in ("/v1/rerank", "/rerank", "/v2/rerank")]
    assert answers[0]["results"] == answers[1]["results"] == answers[2]["results"]
    one = rerank(url, documents=DOCUMENTS[:1])["usage"]["total_tokens"]
    assert 0 < one < answers[0]["usage"]["total_tokens"] == answers[0]["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("body", "param"), [
    ({"query": None}, "query"),
    ({"query": ""}, "query"),
    ({"documents": []}, "documents"),
    ({"documents": "one"}, "documents"),
    ({"documents": ["fine", 3]}, "documents"),
    ({"documents": [{"title": "no text"}]}, "documents"),
    ({"documents": ["x"] * 1001}, "documents"),
    ({"top_n": -1}, "top_n"),
    ({"top_n": "2"}, "top_n"),
    ({"return_documents": "yes"}, "return_documents"),
])
def test_bad_requests_name_the_field(url: str, body: dict[str, Any], param: str) -> None:
    response = httpx.post(url + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_import_does_not_load_torch() -> None:
    code = "import sys, models.rerank.server; print('torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False False"

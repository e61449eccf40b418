"""``--model``: which values can only be folders, and what a missing one is told (core/runtime/model_source.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.runtime.model_source import REPO, looks_like_a_path, missing_folder_problem


@pytest.mark.parametrize(("spec", "path"), [
    ("Qwen/Qwen2.5-7B-Instruct", False), ("gpt2", False), ("BAAI/bge-reranker-v2-m3", False),
    ("/models/qwen", True), ("./tiny", True), ("../tiny", True), (".cache/tiny-models/text", True),
    ("~/models/qwen", True), ("a/b/c", True), ("models/nothing-here", True),  # models/ is a folder here
])
def test_what_can_only_be_a_path(spec: str, path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert looks_like_a_path(spec) is path


def test_a_missing_folder_names_itself_and_the_services_tiny_model_builder(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = REPO / "models" / "rerank" / "server.py"
    problem = missing_folder_problem(".cache/tiny-models/rerank", script)
    assert problem is not None and str(tmp_path / ".cache/tiny-models/rerank") in problem
    assert "`python -m models.rerank.tiny .cache/tiny-models/rerank`" in problem and "models.build_tiny" in problem
    assert missing_folder_problem("./elsewhere", REPO / "models" / "echo" / "server.py") == (
        f"--model ./elsewhere: no such folder ({tmp_path / 'elsewhere'}). Give a local model folder or a hub id "
        "(org/name).")  # echo has no tiny.py
    (tmp_path / "there").mkdir()
    assert missing_folder_problem("./there", script) is None
    assert missing_folder_problem("org/model", script) is None  # a hub id: transformers' business
    assert missing_folder_problem(None, script) is None


def test_the_service_stops_before_loading_anything(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "models" / "whisper" / "server.py"), "--port", "1",
                           "--model", "./never-built"], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "`python -m models.whisper.tiny ./never-built`" in done.stderr, done.stderr

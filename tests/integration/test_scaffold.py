"""scripts/new-model in a copy of the repository: its output passes the project's own checks (ruff,
mypy strict, its tests) unchanged, and its config is one start-all.sh accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.repo_copy import copy_repository, run

pytest.importorskip("transformers")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_new_model_passes_the_checks_unchanged(tmp_path: Path) -> None:
    root = copy_repository(tmp_path)
    made = run(root, ["scripts/new-model", "review_tagger"])
    assert made.returncode == 0, made.stderr
    written = sorted(line.removeprefix("wrote ") for line in made.stdout.splitlines() if line.startswith("wrote "))
    assert "models/review_tagger/server.py" in written and "tests/models/test_review_tagger.py" in written
    assert "pytest tests/models/test_review_tagger.py" in made.stdout  # what to do next
    python = [path for path in written if path.endswith(".py")]
    for argv in ([".venv/bin/ruff", "check", *python], [".venv/bin/mypy", *python],
                 ["scripts/start-all.sh", "--config", "models/review_tagger/models.yaml", "--check"],
                 [".venv/bin/pytest", "-q", "-p", "no:cacheprovider", *[p for p in python if p.startswith("tests/")]]):
        done = run(root, argv)
        assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout[-4000:]}{done.stderr}"
    assert "OK, 1 model: review_tagger" in run(
        root, ["scripts/start-all.sh", "--config", "models/review_tagger/models.yaml", "--check"]).stdout

    again = run(root, ["scripts/new-model", "review_tagger"])  # never overwrites a service being written
    assert again.returncode == 1 and "already there: models/review_tagger/__init__.py" in again.stderr

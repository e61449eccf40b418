"""The suite's own scheduling list (tests/conftest.py SLOW_FILES) names files that exist."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SLOW_FILES

REPO = Path(__file__).resolve().parents[2]


def test_every_slow_file_listed_exists_once() -> None:
    assert [path for path in SLOW_FILES if not (REPO / path).is_file()] == []
    assert len(set(SLOW_FILES)) == len(SLOW_FILES)

"""A copy of the repository for a test to change, as a newcomer's checkout would be: the tracked
files, and the test environment as its ``.venv`` (what scripts/dev-setup.sh or scripts/test.sh
would have built), but no data, caches, logs or run files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from tests.integration.conftest import REPO, processes_with

_LEFT_OUT = shutil.ignore_patterns(".git", ".venv*", ".data", ".cache", "run", "logs", "build", "*.egg-info",
                                   "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
                                   "test-artifacts")


def copy_repository(folder: Path) -> Path:
    root = folder / "ai-orchestrator"
    shutil.copytree(REPO, root, ignore=_LEFT_OUT, symlinks=True)
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return root


def newcomer_env() -> dict[str, str]:
    """This environment without the orchestrator's own settings (AIO_*): the copy's defaults apply."""
    return {name: value for name, value in os.environ.items() if not name.startswith("AIO_")}


def run(root: Path, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=root, env=newcomer_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes started from the copy (its path is in their command line)."""
    return processes_with(str(root))

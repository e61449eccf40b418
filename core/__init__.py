"""Shared by the orchestrator and every model service. Standard library only at import time."""

from __future__ import annotations

import os
from pathlib import Path

# The repository: the folder holding `core` and `models`. resolve() follows an editable
# install's links back to the checkout, where `models/` lives too.
REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_pythonpath(existing: str | None) -> str:
    """A PYTHONPATH with the repository first, so child processes import `core` and `models`."""
    return f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)

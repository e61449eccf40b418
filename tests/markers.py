"""Markers several test modules share."""

from __future__ import annotations

import pytest

# Importing vLLM's serving modules warns (torch.jit deprecations and the like) before any of our code
# runs: those warnings are vLLM's, not ours, and filterwarnings=error would fail the test on them.
vllm_import_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                                  "ignore::UserWarning")

"""The stand-in NVML (tests/fakes/nvml/pynvml.py) loaded into a test's own process, under another name
than ``pynvml`` so the real package, where installed, is never shadowed here. An orchestrator and its
children find it as ``pynvml`` on their PYTHONPATH instead (``fake_driver()`` in tests/integration)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PATH = Path(__file__).resolve().parent / "nvml" / "pynvml.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stand_in_pynvml", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module

"""How much host memory parked models may hold: the ``settings.host_memory_gb`` budget.

On a rented pod the container's memory limit (cgroup), not the machine's RAM, is what the
kernel enforces, and pinned memory cannot be swapped out: the budget starts from the smaller.
"""

from __future__ import annotations

from pathlib import Path

import psutil

_GIB = 1024**3
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def host_memory_gb() -> float:
    """The memory this process may use in all (GiB): RAM, or the container's limit when lower."""
    total = psutil.virtual_memory().total
    for path in _CGROUP_LIMITS:
        limit = _read_limit(path)
        if limit is not None:
            total = min(total, limit)
    return total / _GIB


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def resolve_host_budget(configured: float | str, reserve_gb: float) -> float:
    """The host budget in GiB: the configured number, or (``auto``) the memory minus ``reserve_gb``."""
    if not isinstance(configured, str):
        return float(configured)
    return max(0.0, host_memory_gb() - reserve_gb)

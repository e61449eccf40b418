"""A model service's own health: the states its ``/health`` reports (core/base_service.py) and
its park routes move it through (core/runtime/parking.py)."""

from __future__ import annotations

import enum


class Health(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"
    PARKING = "parking"  # giving its GPU memory back (core/runtime/parking.py)
    PARKED = "parked"
    RESTORING = "restoring"

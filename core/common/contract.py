"""What the orchestrator and a model service agree on, in the one module both sides import.

The orchestrator (supervision) sets these and calls these; a model service (the service
runtime) reads and serves them. Keeping them here, not on either side, is what lets the two
sides never import each other (tests/unit/test_core_layout.py holds that rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

SERVICE_TOKEN_ENV = "AIO_SERVICE_TOKEN"  # the per-run secret a service requires on every route but /health
MODEL_NAME_ENV = "AIO_MODEL_NAME"  # the models.yaml entry a child serves
TENSOR_PARALLEL_ENV = "AIO_TENSOR_PARALLEL"  # GPUs a child spans (models.yaml tensor_parallel), when over one
# NCCL's own switch, set to "1" for a model with peer_to_peer: false; the vLLM service reads it as well, since
# vLLM's custom all-reduce copies between the GPUs directly too (--disable-custom-all-reduce).
PEER_TO_PEER_OFF_ENV = "NCCL_P2P_DISABLE"
# A unix socket a service listens on besides its port (its requests and answers, as on the port): the nginx
# data plane reaches a service there, which costs the kernel less per request and per streamed event than
# loopback TCP. Set by the orchestrator in a private folder only it and its nginx reach.
SERVICE_SOCKET_ENV = "AIO_SERVICE_SOCKET"
_SOCKET_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less its terminating NUL


def service_socket(folder: Path, model: str) -> Path | None:
    """Where ``model``'s service listens in ``folder``: named by a digest (any model name makes a short, safe
    file name); None when the path would be too long for a unix socket (the service then has its port only)."""
    path = folder / f"svc-{hashlib.sha256(model.encode()).hexdigest()[:16]}.sock"
    return path if len(bytes(path)) <= _SOCKET_PATH_MAX else None


def remove_socket(path: str | None) -> None:
    """Remove a service's socket file: the service when it exits, the orchestrator before it starts one (a
    process killed before it could leaves its file, which must not look like the new process's)."""
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

# A service's park routes (core/runtime/parking.py): never reachable from outside (the orchestrator blocks them).
PARK_PATHS = ("/offload", "/restore", "/state")

"""What a model service process is given: its environment and its per-run service token.

Children get an allowlisted part of the orchestrator's environment plus what
``models.yaml`` gives them (a model's ``env``, ``settings.env_passthrough``), never the
whole of it: API keys and hub tokens stay in the process that needs them.

The allowlist (``inherited``) is what a Python model server needs to find its files,
libraries and devices, and the knobs operators tune engines with:

* the process basics: PATH, HOME, USER, LOGNAME, SHELL, TZ, TERM, TMPDIR/TEMP/TMP,
  the locale (LANG, LANGUAGE, LC_*), XDG_* folders, NO_COLOR;
* Python and libraries: PYTHON* (not PYTHONHOME, PYTHONSTARTUP, PYTHONINSPECT or
  PYTHONEXECUTABLE: they belong to the orchestrator's interpreter, and a service may run
  another one), VIRTUAL_ENV, CONDA_PREFIX, LD_LIBRARY_PATH, CC/CXX (Triton compiles);
* devices and math libraries: CUDA_*, NVIDIA_*, NCCL_*, CUBLAS_*, CUDNN_*, HIP_*,
  ROCM_*, HSA_*, OMP_*, KMP_*, MKL_*, OPENBLAS_*, NUMEXPR_*;
* engines and caches: HF_* and HUGGINGFACE_* (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, ...),
  TRANSFORMERS_*, DIFFUSERS_*, SENTENCE_TRANSFORMERS_*, ACCELERATE_*, TOKENIZERS_PARALLELISM,
  TORCH* (TORCH_HOME, TORCHINDUCTOR_*), PYTORCH_*, TRITON_*, VLLM_*;
* certificates: SSL_CERT_FILE, SSL_CERT_DIR, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE.

Whatever matches, a name containing TOKEN, KEY, SECRET, PASSWORD, PASSWD or CREDENTIAL is
never inherited (HF_TOKEN, VLLM_API_KEY, AIO_API_KEYS), unless ``settings.env_passthrough``
names it exactly or the model's own ``env`` sets it (``spec.env`` always wins). Proxy
variables (HTTP_PROXY, ...) are left out too: their URLs often carry a password; a pod
that needs them for hub downloads passes them with ``env_passthrough``.

The service token is a random secret made once per orchestrator run. Services require it
(``Authorization: Bearer``) on every route but ``/health``, and the proxy sends it instead
of the client's own key, so a peer that can reach a service's port directly (a tailnet in
userspace networking mode, another local user) cannot use the service.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from core import repo_pythonpath
from core.common.contract import (
    MODEL_NAME_ENV,
    PEER_TO_PEER_OFF_ENV,
    SERVICE_SOCKET_ENV,
    SERVICE_TOKEN_ENV,
    TENSOR_PARALLEL_ENV,
)
from core.common.redact import secret_env_name
from core.host.memory_share import VRAM_ENV

if TYPE_CHECKING:
    from pathlib import Path

    from core.config.schema import ModelSpec

_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TZ", "TERM", "TMPDIR", "TEMP", "TMP", "LANG", "LANGUAGE",
    "NO_COLOR", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "CC", "CXX", "TOKENIZERS_PARALLELISM",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
})
_PREFIXES = (
    "LC_", "XDG_", "PYTHON", "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_", "CUDNN_", "HIP_", "ROCM_", "HSA_",
    "OMP_", "KMP_", "MKL_", "OPENBLAS_", "NUMEXPR_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_",
    "SENTENCE_TRANSFORMERS_", "ACCELERATE_", "TORCH", "PYTORCH_", "TRITON_", "VLLM_",
)
_NOT_INHERITED = frozenset({"PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONEXECUTABLE"})


def new_service_token() -> str:
    return secrets.token_urlsafe(32)


def inherited(name: str, passthrough: Iterable[str] = ()) -> bool:
    """Whether the orchestrator's variable ``name`` reaches its children.

    ``passthrough`` holds names (always passed, secrets too) and prefixes ending in ``*``
    (passed unless the name looks secret).
    """
    patterns = tuple(passthrough)
    if name in patterns:
        return True
    if secret_env_name(name):
        return False
    if name in _NAMES or (name.startswith(_PREFIXES) and name not in _NOT_INHERITED):
        return True
    return any(p.endswith("*") and name.startswith(p[:-1]) for p in patterns)


def service_env(spec: ModelSpec, token: str | None = None, passthrough: Iterable[str] = (),
                base: Mapping[str, str] | None = None, socket: Path | None = None) -> dict[str, str]:
    """The child's environment: the allowlisted part of ours (``base``, default ``os.environ``),
    the spec's additions, unbuffered output, CUDA's device order as NVML's, `core` importable, the
    service token, its GPU share (``vram_gb``) for the engines to keep to (see core/host/memory_share.py),
    and the unix socket to listen on as well, when there is one (the nginx data plane's)."""
    patterns = tuple(passthrough)
    source = os.environ if base is None else base
    env = {name: value for name, value in source.items() if inherited(name, patterns)}
    # CUDA numbers devices fastest first by default, NVML (the orchestrator's view) by PCI bus: on a
    # multi-GPU host device 0 would be two different cards. The model's own env may still say otherwise.
    env.update({"PYTHONUNBUFFERED": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **spec.env})
    env.pop(VRAM_ENV, None)  # never inherit another model's share
    env.pop(SERVICE_TOKEN_ENV, None)
    if spec.vram_gb is not None:  # 0 too: a service told it has no GPU share refuses to use the GPU
        env[VRAM_ENV] = f"{spec.vram_gb:g}"
    env.pop(TENSOR_PARALLEL_ENV, None)
    if spec.tensor_parallel > 1:  # its share is per GPU; the engine spans this many (vLLM's tensor parallel)
        env[TENSOR_PARALLEL_ENV] = str(spec.tensor_parallel)
    if not spec.peer_to_peer:
        env[PEER_TO_PEER_OFF_ENV] = "1"
    if spec.service_script is not None:
        env["PYTHONPATH"] = repo_pythonpath(env.get("PYTHONPATH"))
    if token is not None:
        env[SERVICE_TOKEN_ENV] = token
    env.pop(SERVICE_SOCKET_ENV, None)
    if socket is not None:
        env[SERVICE_SOCKET_ENV] = str(socket)
    env[MODEL_NAME_ENV] = spec.name
    return env


def placed_env(devices: tuple[int, ...]) -> dict[str, str]:
    """What a child is told of the GPUs it was placed on: their NVML indices, which name the same cards in
    its CUDA as every child runs with CUDA_DEVICE_ORDER=PCI_BUS_ID; never ordinals renumbered under the
    orchestrator's own mask. Placed on none (no GPU accounting): nothing, the inherited mask stands."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in devices)} if devices else {}

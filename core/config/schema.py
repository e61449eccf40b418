"""Typed ``models.yaml``: every key validated at load, errors that name file, model and key.

Layout of the file::

    settings:        # optional; global knobs (listen address, GPU budget, queueing, ...)
      port: 9000
    models:
      qwen:          # the model name clients send as "model"
        type: text
        service_script: models/vllm/server.py
        port: 8001
        ...

``load_config(path)`` (core/config/load.py) is the only entry point the rest of the code uses. It parses
(refusing duplicate keys), validates the structure with pydantic, then checks what
needs the file system (scripts and interpreters exist) and cross-model rules
(unique ports, names and aliases; defaults that exist).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator

from core.config.park import ParkSpec
from core.config.strict_model import Strict as _Strict

ModelType = Literal["text", "image", "audio", "transcription", "embedding", "rerank", "custom"]
Placement = Literal["pack", "spread"]




def gpu_names(names: list[int | str] | None) -> list[int | str] | None:
    """A ``gpus``/``devices`` list: NVML indices or UUIDs (checked by the fields' validators)."""
    bad = [name for name in names or [] if (isinstance(name, int) and name < 0) or (isinstance(name, str) and not name)]
    if bad:
        raise ValueError(f"GPUs are NVML indices (0, 1, ...) or UUIDs (GPU-...), not {bad}")
    return names


# Placeholders a `command` or `args` entry may use; replaced literally (no str.format,
# so JSON arguments with braces pass through untouched).
PLACEHOLDERS = ("{port}", "{host}", "{model}", "{python}", "{base_dir}", "{weights}", "{tensor_parallel}",
                "{gpu_memory_utilization}")


class ConfigError(ValueError):
    """models.yaml is invalid; the message names the file, the model and the key."""


class WeightsSpec(_Strict):
    """Where a model's weights come from: a hub repository, and which of its files the service loads.

    Provisioning downloads exactly this (the playbook's `models` tag reads it from the served
    profile), and ``{weights}`` in ``args``/``command`` passes the repo id to the service, which
    resolves it from the HF cache.
    """

    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$",
                      description="Hugging Face hub repo id, e.g. Qwen/Qwen2.5-7B-Instruct.")
    revision: str = Field("main", min_length=1, description="Branch, tag or commit to download.")
    allow_patterns: list[str] = Field(
        default_factory=list, description="Only files matching these globs are downloaded (empty: every file)."
    )
    ignore_patterns: list[str] = Field(
        default_factory=list, description="Files matching these globs are skipped (e.g. a second copy of the "
        "weights in another format)."
    )
    size_gb: float | None = Field(
        None, ge=0, description="Download size in GiB of the allowed files (for the disk check and the docs)."
    )


class ModelSpec(_Strict):
    """One model service: how to start it, where it listens, and how to schedule it."""

    type: ModelType = Field(description="What the model serves: text, image, audio (speech or music out), "
                            "transcription (speech in), embedding, rerank or custom.")
    service_script: str | None = Field(
        None, description="Python file of a BaseService server, started as `python SCRIPT --host H --port P`."
    )
    command: str | list[str] | None = Field(
        None,
        description="Any OpenAI-compatible server command line instead of service_script "
        "(e.g. `vllm serve MODEL --port {port}`). Placeholders: {port} {host} {model} {python} {base_dir} "
        "{weights} {tensor_parallel} {gpu_memory_utilization} (vram_gb over the total of the GPU it is placed on).",
    )
    args: list[str] = Field(default_factory=list, description="Extra arguments appended to the command "
                            "(same placeholders; {base_dir} makes paths independent of the working directory).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables added for this service.")
    python: str | None = Field(
        None, description="Interpreter (path, name on PATH, or a venv folder) for service_script. "
        "Default: the orchestrator's own interpreter. Provisioning (core/config/render.py) fills it in "
        "with the profile's model environment only where it is left out: one you set is kept."
    )
    port: int = Field(ge=1, le=65535, description="Port the service listens on (127.0.0.1 unless host says otherwise).")
    host: str = Field("127.0.0.1", description="Address the service binds and the orchestrator connects to.")
    startup_time: float = Field(
        120, gt=0, description="Seconds the service may take to answer its health check before start fails."
    )
    endpoint: str | None = Field(
        None, description="The model's main OpenAI route; requests to it without `model` go to this model."
    )
    aliases: list[str] = Field(default_factory=list, description="Other names clients may use for this model. "
                               "The orchestrator replaces an alias by the model's name in the request body, so "
                               "the service sees, and its answers carry, the model's name.")
    vram_gb: float | None = Field(
        None, ge=0, description="GPU memory the service needs on each GPU it runs on (0: none, it runs on CPU). "
        "Unset: it needs whole GPUs, so it runs alone on them."
    )
    ttl: float = Field(0, ge=0, description="Stop the service after this many idle seconds; 0 keeps it running.")
    pinned: bool = Field(False, description="Never evicted to make room for another model.")
    gpus: list[int | str] | None = Field(
        None, min_length=1, description="The GPUs this model may run on (NVML indices, as nvidia-smi numbers "
        "them, or UUIDs); default: any of settings.gpus.devices.")
    tensor_parallel: int = Field(1, ge=1, le=64, description="GPUs of one kind the model spans; its vram_gb "
                                 "is claimed on each (vLLM gets --tensor-parallel-size from it).")
    peer_to_peer: bool = Field(True, description="Direct copies between the GPUs a tensor-parallel model spans. "
                               "false for PCIe cards without NVLink where they hang or fail: the service gets "
                               "NCCL_P2P_DISABLE=1, and the vLLM service turns off its custom all-reduce.")
    placement: Placement | None = Field(None, description="How a GPU is chosen when several fit: pack (the "
                                        "tightest fit, keeping large holes for large models) or spread (the "
                                        "most free); default settings.gpus.placement.")
    preload: bool = Field(False, description="Start at orchestrator boot instead of on the first request.")
    health_path: str = Field("/health", description="Path that answers 200 once the service can serve.")
    max_concurrency: int = Field(
        32, ge=1, description="Requests proxied to this service at once; more wait in the queue (up to "
        "settings.max_queue, then 503 with Retry-After). Bounded by default so a single-worker service "
        "never has an unbounded backlog inside it."
    )
    stop_timeout: float = Field(
        15, gt=0, description="Seconds between SIGTERM and SIGKILL when stopping the service."
    )
    request_timeout: float = Field(
        600, gt=0, description="Seconds the upstream may stay silent (no byte) before the request fails with 504."
    )
    max_restarts: int = Field(
        3, ge=1, description="Failures within settings.restart_window after which the model is marked failed."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free data shown in /v1/models.")
    weights: WeightsSpec | None = Field(
        None, description="Hub weights the model loads: downloaded by provisioning, passed as {weights}."
    )
    park: ParkSpec = Field(default_factory=ParkSpec, description="Parking instead of stopping (warm swap).")

    if TYPE_CHECKING:
        name: ClassVar[str]  # the key in models.yaml ("" until OrchestratorConfig names it): not a field

    def model_post_init(self, context: Any, /) -> None:
        self.named("")

    def named(self, name: str) -> None:
        # A plain instance attribute, not a property over a private attribute: read several times on every
        # proxied request, and a pydantic private attribute costs ~1.8 us a read (__getattr__), this 0.05.
        object.__setattr__(self, "name", name)

    @field_validator("gpus")
    @classmethod
    def _gpu_names(cls, value: list[int | str] | None) -> list[int | str] | None:
        return gpu_names(value)

    @field_validator("endpoint", "health_path")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value

    @field_validator("endpoint")
    @classmethod
    def _client_route(cls, value: str | None) -> str | None:
        # Clients reach a service only under /v1/, on a path in its one plain form (model_orchestrator/paths.py).
        if value is None:
            return value
        segments = value.split("/")[1:]
        if not value.startswith("/v1/") or any(s in ("", ".", "..") for s in segments) or set("%?#\\") & set(value):
            raise ValueError(f"must be a plain route under /v1/ (e.g. /v1/rerank), got {value!r}")
        return value

    @field_validator("command")
    @classmethod
    def _non_empty_command(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and not (shlex.split(value) if isinstance(value, str) else value):
            raise ValueError("must not be empty")
        return value

    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def names(self) -> list[str]:
        """The model name followed by its aliases."""
        return [self.name, *self.aliases]


class Limits(_Strict):
    """Per-client bounds (the `settings.limits:` section): a public port must not let one client
    take the orchestrator's memory, file descriptors or event loop."""

    json_body_mb: float = Field(16, gt=0, description="Largest JSON request body (MiB) on the OpenAI routes; "
                                "larger gets 413.")
    upload_body_mb: float = Field(64, gt=0, description="Largest body (MiB) on upload routes (multipart: "
                                  "audio transcriptions, image edits) and /upstream.")
    json_max_depth: int = Field(64, ge=2, description="Deepest JSON nesting accepted; deeper gets 400.")
    body_timeout: float = Field(60, gt=0, description="Seconds a client may take to send a whole request body "
                                "(stalled uploads get 408).")
    header_timeout: float = Field(10, gt=0, description="Seconds a new connection may take to send its request "
                                  "headers before it is closed (slowloris).")
    keep_alive_timeout: float = Field(5, gt=0, description="Seconds an idle keep-alive connection stays open.")
    max_requests: int = Field(512, ge=1, description="Requests handled at once across all models; more get "
                              "503 with Retry-After.")
    max_connections: int = Field(2048, ge=1, description="Open client connections at once; more are refused.")
    max_log_followers: int = Field(8, ge=1, description="Clients following a log (/logs?follow) at once.")


class GpuSettings(_Strict):
    """The GPUs of the pod: which ones models go on, what stays free on each, the default placement."""

    devices: list[int | str] | None = Field(
        None, min_length=1, description="The GPUs to place models on (NVML indices or UUIDs); default: every "
        "GPU the orchestrator's own CUDA_VISIBLE_DEVICES allows.")
    reserve_gb: float = Field(0.0, ge=0, description="GPU memory kept free on each GPU (other processes, "
                              "the display), taken off its budget.")
    placement: Placement = Field("pack", description="Default for models without placement: pack or spread.")
    cap_gb: dict[int | str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="Lower budgets for single GPUs (NVML index or UUID: GiB), under "
        "gpu_memory_gb; e.g. {0: 20} leaves 4 GB of a 24 GB card that also drives a display to others.")

    @field_validator("devices")
    @classmethod
    def _gpu_names(cls, value: list[int | str] | None) -> list[int | str] | None:
        return gpu_names(value)

    @field_validator("cap_gb")
    @classmethod
    def _capped_gpus(cls, value: dict[int | str, float]) -> dict[int | str, float]:
        gpu_names(list(value))
        return value


class DataPlane(_Strict):
    """What moves the bytes of client requests (the `settings.data_plane` section)."""

    kind: Literal["python", "nginx"] = Field(
        "python", description="python: the orchestrator proxies every request itself. nginx: nginx (with njs) "
        "listens on host:port and sends requests for a ready pinned model (pinned, ttl 0, park.idle 0), named by "
        "its own name, straight to its service; every other request reaches the orchestrator through it as before "
        "(docs/data-plane.md).")
    nginx: str = Field("nginx", description="The nginx binary (a name on PATH or a path).")
    njs_module: str | None = Field(
        None, description="ngx_http_js_module.so to load (Debian: libnginx-mod-http-js; nginx.org: "
        "nginx-module-njs). Default: found in the usual module folders; none found: nginx must have njs built in.")
    workers: int = Field(1, ge=1, le=64, description="nginx worker processes (one per core it may use).")


class Settings(_Strict):
    """Global settings (the `settings:` section)."""

    host: str = Field("127.0.0.1", description="Address the orchestrator listens on (0.0.0.0 for every interface).")
    port: int = Field(9000, ge=1, le=65535, description="Port of the OpenAI-compatible endpoint.")
    gpu_memory_gb: float | Literal["auto"] = Field(
        "auto", description="GPU memory budget for models with vram_gb, per GPU. 'auto' reads each GPU's total "
        "through NVML; without a GPU or NVML the budget is unlimited."
    )
    gpus: GpuSettings = Field(default_factory=GpuSettings,
                              description="Which GPUs models are placed on, and how.")
    host_memory_gb: float | Literal["auto"] = Field(
        "auto", description="Host memory (GiB) parked models may hold (their weights wait there). 'auto': the "
        "machine's (or container's) memory minus host_memory_reserve_gb; 0: never park, always stop."
    )
    host_memory_reserve_gb: float = Field(
        16, ge=0, description="With host_memory_gb 'auto': host memory kept free for everything else."
    )
    gpu_process_overhead_gb: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="GPU memory each model process holds beyond its vram_gb (its CUDA context), "
        "counted in the GPU budget while it runs and while it is parked. 'auto': 0.5 when NVML sees a GPU, "
        "else 0 (CPU services hold no CUDA context). Models with vram_gb 0 hold none."
    )
    log_dir: str = Field("logs", description="Folder for per-service log files (relative to base_dir).")
    base_dir: str | None = Field(
        None, description="Folder that relative paths are resolved against. Default: the folder of this file."
    )
    defaults: dict[ModelType, str] = Field(
        default_factory=dict, description="Model used per endpoint type when a request names none."
    )
    max_queue: int = Field(64, ge=1, description="Requests that may wait per model; more are refused with 503.")
    stream_keep_alive: float = Field(
        5, ge=0, description="Seconds between SSE comments (`: loading MODEL 12s`) sent to a streaming request "
        "while it waits for its model to load, so proxies and clients do not drop a silent connection; 0: none."
    )
    max_wait: float = Field(
        600, gt=0, description="Seconds a request may wait for its model (queue, swap and start) before 503."
    )
    batch_window: float = Field(
        5, ge=0, description="Seconds a busy model keeps admitting new requests after another model needing "
        "its memory started waiting. Batches requests per model instead of swapping on each one."
    )
    restart_backoff: float = Field(1, ge=0, description="Delay before the first restart after a failure (doubles).")
    restart_backoff_max: float = Field(60, ge=0, description="Upper bound of the restart delay.")
    restart_window: float = Field(300, gt=0, description="Seconds over which failures count towards max_restarts.")
    failed_cooldown: float = Field(
        300, gt=0, description="Seconds a failed model refuses requests (503, Retry-After) before one more try."
    )
    drain_timeout: float = Field(30, ge=0, description="Seconds in-flight requests get to finish on shutdown.")
    api_key_env: str | None = Field(
        "AIO_API_KEYS", description="Environment variable holding comma-separated client API keys: they reach "
        "the OpenAI routes and /v1/models (`Authorization: Bearer <key>`). Admin keys work there too."
    )
    admin_key_env: str | None = Field(
        "AIO_ADMIN_KEYS", description="Environment variable holding comma-separated admin keys: only they reach "
        "/admin, /logs, /upstream, the full /status, /docs and /openapi.json."
    )
    fleet_key_env: str | None = Field(
        "AIO_FLEET_KEYS", description="Environment variable holding comma-separated fleet keys: they reach "
        "GET /fleet/state only (a gateway in front of several pods reads it with one; admin keys work too)."
    )
    pod_id: str | None = Field(
        None, description="This pod's name in GET /fleet/state, for a gateway in front of several pods "
        "(default: the machine's host name)."
    )
    watch_config: bool = Field(
        False, description="Reload this file when it changes (checked every second, applied once it has been "
        "still for a second), as POST /admin/reload and SIGHUP do."
    )
    api_keys_file: str | None = Field(
        None, description="A file of client keys (one per line or comma-separated; relative to base_dir), read at "
        "start and at every reload, so keys can be rotated without a restart. Keys from api_key_env count too."
    )
    admin_keys_file: str | None = Field(
        None, description="A file of admin keys, like api_keys_file. Keys from admin_key_env count too."
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve without any key on a non-loopback address. Without it the orchestrator "
        "refuses to start when it listens beyond 127.0.0.1 and no key is configured."
    )
    env_passthrough: list[str] = Field(
        default_factory=list, description="Extra variables of the orchestrator's environment passed to every "
        "service (names, or prefixes ending in '*'), beyond the built-in allowlist (PATH, HOME, locale, "
        "CUDA_*, HF_HOME, ...). Secrets such as HF_TOKEN are passed only if named here or in a model's env."
    )
    health_interval: float = Field(
        10, ge=0, description="Seconds between health probes of a ready service; 0 turns probing off."
    )
    health_failures: int = Field(
        3, ge=1, description="Consecutive failed health probes (or upstream timeouts) after which a ready "
        "service counts as hung and is restarted."
    )
    limits: Limits = Field(default_factory=Limits, description="Bounds on what clients may use.")
    data_plane: DataPlane = Field(default_factory=DataPlane, description="What moves the bytes of client "
                                  "requests: the orchestrator itself, or nginx in front of it.")
    log_lines: int = Field(2000, ge=10, description="Recent log lines kept in memory per service (/logs).")
    log_max_mb: float = Field(
        50, gt=0, description="A service's log file is rotated (NAME.log.1, ...) when it grows past this size."
    )
    log_backups: int = Field(3, ge=0, description="Rotated log files kept per service.")


class OrchestratorConfig(_Strict):
    """The whole models.yaml."""

    settings: Settings = Field(default_factory=Settings)
    models: dict[str, ModelSpec] = Field(description="Model services by name.")
    _source: Path | None = PrivateAttr(None)
    _base_dir: Path = PrivateAttr(Path("."))

    def model_post_init(self, context: Any, /) -> None:
        for name, spec in self.models.items():
            spec.named(name)

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> Path | None:
        return self._source

    def log_dir(self) -> Path:
        return self.resolve_path(self.settings.log_dir)

    def resolve_path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self._base_dir / path).resolve()

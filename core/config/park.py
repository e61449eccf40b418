"""The ``park:`` key of a model in models.yaml: whether and how it is parked instead of stopped.

Parking keeps a service's process and gives its GPU memory back (core/runtime/parking.py); the
orchestrator parks a model it must evict when host memory allows (settings.host_memory_gb),
and restores it in seconds instead of a cold start. Services started from ``service_script``
park through their own ``/offload`` and ``/restore``; a ``command`` model (``vllm serve``,
SGLang, ...) declares the HTTP calls that park and restore it, or names the ``vllm`` preset.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from core.config.strict_model import Strict

# vllm serve's development routes (VLLM_SERVER_DEV_MODE=1, which the sleep routes need); they
# reach into the engine (collective_rpc runs any worker method), so the orchestrator never
# forwards a client's request to them (/upstream refuses them).
VLLM_DEV_PATHS = (
    "/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache", "/reset_mm_cache",
    "/reset_encoder_cache", "/server_info", "/abort_requests", "/pause", "/resume", "/is_paused",
    "/release_kv_cache_memory", "/get_world_size", "/init_weight_transfer_engine", "/start_weight_update",
    "/update_weights", "/finish_weight_update", "/shutdown_weight_transfer_engine", "/update_weight_version",
    "/start_draft_weight_update", "/weight_checker", "/weight_info",
)


class HttpCall(Strict):
    """One HTTP call to the model's server (the orchestrator sends its service token too)."""

    method: Literal["GET", "POST", "PUT", "DELETE"] = Field("POST", description="HTTP method.")
    path: str = Field(description="Path and query, e.g. `/sleep?level={level}`. Placeholders: {level} {model}.")
    body: dict[str, Any] | None = Field(None, description="JSON body to send (placeholders are filled in strings).")
    optional: bool = Field(False, description="A failure is logged and ignored (e.g. a warm-up request).")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        return value

    def route(self) -> str:
        """The path without its query string."""
        return self.path.split("?", 1)[0]


class ParkCalls(Strict):
    """The HTTP calls that park and restore a ``command`` model, in order; each must answer 2xx."""

    park: list[HttpCall] = Field(min_length=1, description="Calls that give the GPU memory back.")
    restore: list[HttpCall] = Field(min_length=1, description="Calls that make the model serve again.")
    private_paths: list[str] = Field(
        default_factory=list, description="More paths of the server that clients may never reach through "
        "/upstream (the calls' own paths always are).")


def vllm_calls(level: int) -> ParkCalls:
    """``vllm serve --enable-sleep-mode`` with ``VLLM_SERVER_DEV_MODE=1``: level and mode go in the
    query string (a JSON body is ignored). Waking from level 2 follows vLLM's full sequence, or the
    model answers "!!!!" (vllm #29341): weights, reload them, KV cache, reset the prefix cache."""
    wake = ([HttpCall(path="/wake_up")] if level == 1 else [
        HttpCall(path="/wake_up?tags=weights"),
        HttpCall(path="/collective_rpc", body={"method": "reload_weights"}),
        HttpCall(path="/wake_up?tags=kv_cache"),
        HttpCall(path="/reset_prefix_cache"),
    ])
    warmup = HttpCall(path="/v1/completions", body={"model": "{model}", "prompt": "hi", "max_tokens": 1},
                      optional=True)  # the first request after waking is seconds faster with it
    return ParkCalls(park=[HttpCall(path="/sleep?level={level}&mode=wait")], restore=[*wake, warmup],
                     private_paths=list(VLLM_DEV_PATHS))


class ParkSpec(Strict):
    """How a model is parked (the `park:` key of a model)."""

    enabled: bool = Field(True, description="Park the model (keep its process, give its GPU memory back) "
                          "instead of stopping it when another model needs the memory and host memory allows.")
    level: Literal[1, 2] = Field(1, description="1: weights wait in host memory (restore ~1-3 s); 2: weights "
                                 "dropped and reloaded from disk on restore (slower, holds no host memory).")
    host_gb: float | None = Field(
        None, ge=0, description="Host memory (GiB) a level-1 park holds. Default: weights.size_gb, else vram_gb; "
        "with neither it parks only while no other model holds host memory.")
    vram_kept_gb: float = Field(0, ge=0, description="GPU memory it keeps while parked besides its CUDA context "
                                "(vLLM keeps its CUDA graphs: about 1-2 GB for a 7B model), counted in the GPU budget.")
    idle: float = Field(0, ge=0, description="Park after this many idle seconds (0: only when another model "
                        "needs the memory); `ttl` then stops it later.")
    timeout: float = Field(300, gt=0, description="Seconds a park or a restore may take; longer counts as failed "
                           "and the model is stopped (started cold next time).")
    calls: Literal["vllm"] | ParkCalls | None = Field(
        None, description="For `command` models: the HTTP calls that park and restore the server, or `vllm` for "
        "`vllm serve --enable-sleep-mode` with VLLM_SERVER_DEV_MODE=1. Without them a command model is stopped, "
        "never parked. service_script models park through their own /offload and /restore.")

    def resolved_calls(self) -> ParkCalls | None:
        return vllm_calls(self.level) if self.calls == "vllm" else self.calls if isinstance(self.calls, ParkCalls) \
            else None

"""Which models.yaml keys a reload applies to a running orchestrator, and how (model_orchestrator/reload_plan.py
carries it out; core/config/docs.py prints it in docs/models-yaml.md). Every key not named here applies live."""

from __future__ import annotations

# ModelSpec fields the service process is started with (its command line, environment, device and
# memory share): a change restarts it. Every other field is read per request or per decision.
PROCESS_FIELDS = frozenset({"service_script", "command", "args", "env", "python", "port", "host", "vram_gb",
                            "gpus", "tensor_parallel", "peer_to_peer", "placement", "weights"})
# Settings only a new orchestrator process can apply: the listening socket, the folders, the HTTP
# server's own bounds, what every service's environment and log was built with, and the GPU inventory.
RESTART_SETTINGS = {
    "host": "the address the orchestrator listens on", "port": "the port the orchestrator listens on",
    "base_dir": "the folder every path is relative to", "log_dir": "the folder service logs are written to",
    "limits.header_timeout": "the HTTP server's own bound", "limits.keep_alive_timeout": "the HTTP server's own bound",
    "limits.max_connections": "the HTTP server's own bound",
    "env_passthrough": "the environment every service was built with",
    "log_lines": "each service's log buffer", "log_max_mb": "each service's log files",
    "log_backups": "each service's log files", "limits.max_log_followers": "each service's log buffer",
    "health_interval": "each service's health watch", "health_failures": "each service's health watch",
    "restart_backoff": "each service's restart policy", "restart_backoff_max": "each service's restart policy",
    "restart_window": "each service's restart policy", "failed_cooldown": "each service's restart policy",
    "gpus": "the GPU inventory and each model's placement", "gpu_process_overhead_gb": "the GPU inventory",
    "allow_unauthenticated": "the exposure check made at start",
    "data_plane": "what listens on host:port, started with it",
}


def model_key_on_reload(name: str) -> str:
    return "restarts the model" if name in PROCESS_FIELDS else "live"


def setting_on_reload(name: str) -> str:
    return "restart the orchestrator" if name in RESTART_SETTINGS else "live"

"""nginx's configuration for the data plane: a pure function of the settings, the fast-path models and paths.

What nginx does itself, it does as the orchestrator would (settings.limits): the header and keep-alive
timeouts, the header size bound (64 KiB), the connection bound. Bodies are not bounded here beyond the
largest the orchestrator accepts (upload_body_mb): it applies its own per-route limits to what it is sent.
The fast path's requests are bounded as the orchestrator bounds a model (max_concurrency as max_conns,
request_timeout as the read timeout), their errors are the orchestrator's OpenAI envelopes, and the client's
credentials are replaced by the service token on the way to a service, as the proxy does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.common.errors import error_bytes
from core.config.schema import Settings
from model_orchestrator.dataplane.policy import FAST_BODY_MAX, FAST_ROUTES, Upstream
from model_orchestrator.http_server import MAX_HEADER_BYTES

ROUTER = Path(__file__).with_name("route.js")
_MIB = 1024 * 1024
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # the folders nginx writes temporary files in
# What the proxy (proxy.py) keeps from a service too: the client's credentials and the hop-by-hop headers
# nginx would pass on (it handles Connection, Transfer-Encoding and Expect itself).
_DROPPED = " ".join(f"proxy_set_header {name} '';" for name in (
    "X-Api-Key", "Cookie", "Proxy-Authorization", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Upgrade"))
# Requests on the orchestrator's side wait for cold starts and queues (max_wait), with their own timeouts.
_ORCHESTRATOR_TIMEOUT = "1d"
# The fast path's log is written in blocks, not with a system call per request; the orchestrator reads it
# every second (dataplane/plane.py), so a request counts in /metrics within about two seconds.
_LOG_FLUSH = "1s"
_LOG_FORMAT = ("log_format aio_fast escape=json '{\"model\":\"$aio_model\",\"route\":\"$uri\",\"status\":$status,"
               "\"seconds\":$request_time,\"first_byte\":\"$upstream_header_time\","
               "\"type\":\"$upstream_http_content_type\"}';")


@dataclass(frozen=True)
class Paths:
    """Where nginx keeps its files: a private folder (mode 0700) of the orchestrator's."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def table(self) -> Path:
        return self.root / "routes.json"

    @property
    def orchestrator_socket(self) -> Path:
        return self.root / "orchestrator.sock"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def fast_log(self) -> Path:
        return self.root / "fast.log"


def quoted(text: str) -> str:
    """``text`` as one nginx string argument (single quotes; a quote or backslash escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ms(seconds: float) -> str:
    """A time for nginx, which takes whole numbers only (0.5s is refused; 500ms is not)."""
    return f"{max(1, round(seconds * 1000))}ms"


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def failed_bodies(upstreams: list[Upstream]) -> dict[str, str]:
    """The 502 each fast-path model's requests get when the service broke off before answering."""
    return {up.location: error_bytes(f"Model {up.model!r} failed before answering: the connection broke off.", 502,
                                     "upstream_error").decode() for up in upstreams}


def nginx_conf(settings: Settings, upstreams: list[Upstream], paths: Paths, service_token: str | None,
               njs_module: str | None, user: str | None = None) -> str:
    """The whole nginx.conf. ``user``: the user its workers run as, when it starts as root (nginx would
    otherwise run them as nobody, who may not read its files or reach the orchestrator's socket)."""
    limits = settings.limits
    head = [f"load_module {quoted(njs_module)};"] if njs_module else []
    head += [f"user {user};"] if user else []
    # A proxied request holds two connections, the client's and the upstream's.
    head += ["daemon off;", "master_process on;", f"worker_processes {settings.data_plane.workers};",
             f"pid {quoted(str(paths.root / 'nginx.pid'))};", "error_log stderr warn;",
             f"events {{ worker_connections {2 * limits.max_connections + 64}; }}"]
    http = [
        "access_log off;", "server_tokens off;", "default_type application/json;",
        *(f"{kind}_temp_path {quoted(str(paths.root / kind))};" for kind in TEMP_KINDS),
        f"js_path {quoted(str(ROUTER.parent))};", f"js_import aio from {ROUTER.name};",
        f"js_preload_object table from {quoted(str(paths.table))};",
        # Only the fast path's locations set $aio_model: without one, nginx would refuse the variable.
        *([_LOG_FORMAT] if upstreams else []),
        f"client_header_timeout {ms(limits.header_timeout)};", f"keepalive_timeout {ms(limits.keep_alive_timeout)};",
        f"client_body_timeout {ms(limits.body_timeout)};", f"client_max_body_size {int(limits.upload_body_mb * _MIB)};",
        f"large_client_header_buffers 4 {MAX_HEADER_BYTES // 4 // 1024}k;",
        "proxy_http_version 1.1;", "proxy_buffering off;", "proxy_request_buffering off;",
        f"upstream orchestrator {{ server {quoted(f'unix:{paths.orchestrator_socket}')}; keepalive 64; }}",
        *(f"upstream {up.location[1:]} {{ server {quoted(up.server)} max_conns={up.max_conns} max_fails=0; "
          "keepalive 32; }"
          for up in upstreams),
        _public_server(settings, upstreams, paths, service_token),
        f"server {{ listen {quoted(f'unix:{paths.control_socket}')}; "
        "location = /generation { js_content aio.generation; } }",
    ]
    return "\n".join([*head, "http {", *("    " + line for line in http), "}", ""])


def _public_server(settings: Settings, upstreams: list[Upstream], paths: Paths, service_token: str | None) -> str:
    orchestrator = ("proxy_pass http://orchestrator; proxy_set_header Connection ''; proxy_set_header Host $http_host; "
                    f"proxy_read_timeout {_ORCHESTRATOR_TIMEOUT}; proxy_send_timeout {_ORCHESTRATOR_TIMEOUT}; "
                    "error_page 502 = @unavailable;")
    unavailable = error_bytes("The orchestrator is starting or stopping; retry shortly.", 503, "unavailable").decode()
    lines = [f"listen {listen_address(settings.host, settings.port)};",
             f"location / {{ {orchestrator} }}", f"location @orchestrator {{ {orchestrator} }}",
             f"location @unavailable {{ add_header Retry-After 1 always; return 503 {quoted(unavailable)}; }}"]
    lines += [f"location = {route} {{ client_body_buffer_size {FAST_BODY_MAX // _MIB}m; js_content aio.route; }}"
              for route in FAST_ROUTES]
    lines += [_model_location(up, service_token, paths.fast_log) for up in upstreams]
    return "server {\n" + "".join(f"        {line}\n" for line in lines) + "    }"


def _model_location(up: Upstream, service_token: str | None, fast_log: Path) -> str:
    """A fast-path model's location: to its service with the service token for credentials; a request nginx
    could not send goes on to route.js's ``failed``; silence past request_timeout is the orchestrator's 504."""
    authorization = quoted(f"Bearer {service_token}" if service_token else "")
    timeout = error_bytes(f"Model {up.model!r} did not answer within {up.read_timeout:g}s (request_timeout).",
                          504, "upstream_timeout").decode()
    return (f"location {up.location} {{ set $aio_model {quoted(up.model)}; set $aio_location {up.location}; "
            f"proxy_pass http://{up.location[1:]}; proxy_set_header Host {up.address}; "
            "proxy_set_header Connection ''; "
            f"proxy_set_header Authorization {authorization}; {_DROPPED} "
            f"proxy_read_timeout {ms(up.read_timeout)}; proxy_next_upstream off; "
            f"access_log {quoted(str(fast_log))} aio_fast buffer=64k flush={_LOG_FLUSH}; "
            f"error_page 502 503 = {up.location}_failed; error_page 504 = {up.location}_timeout; }}\n"
            f"        location {up.location}_failed {{ js_content aio.failed; }}\n"
            f"        location {up.location}_timeout {{ return 504 {quoted(timeout)}; }}")


def table_json(table: dict[str, object], upstreams: list[Upstream]) -> str:
    return json.dumps({**table, "failed": failed_bodies(upstreams)})

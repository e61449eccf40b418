"""What nginx would cost as the data plane, routing by the body's ``model`` with njs (issue #25's second option).

    .venv/bin/python -m bench.dataplane_probe [--rounds 5] [--duration 3]

Needs Debian's ``nginx`` and ``libnginx-mod-http-js`` (njs). The same fast fake backend as
proxy_bench.py is reached directly, through plain nginx (proxy_bench's configuration), and through
nginx whose ``js_content`` handler parses the JSON body, takes its ``model`` and redirects to that
model's upstream (``r.internalRedirect`` to a named location that proxies the body already read).
That is the fast path of the split: a ready model, a well-formed body. Everything else would fall
through to the orchestrator, which this probe leaves out. Pinning and interleaving as in proxy_bench.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench import proxy_bench
from bench.common import (
    NGINX_COMMON,
    Nginx,
    backend_command,
    cores,
    free_port,
    pin,
    spawn_pinned,
    start_nginx,
    wait_http,
)

JS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
ROUTE_JS = r"""
function route(r) {
    var model;
    try { model = JSON.parse(r.requestText).model; } catch (e) { r.return(400, '{"error": "bad json"}'); return; }
    if (model === 'bench') { r.internalRedirect('@bench'); } else { r.return(404, '{"error": "no model"}'); }
}
export default {route};
"""
NJS_CONF = "load_module {module};" + NGINX_COMMON + """
    js_import route from {prefix}/route.js;
    upstream bench {{ server 127.0.0.1:{backend} max_conns=64; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        client_body_buffer_size 64k;
        location = /health {{ return 200 "ok"; }}
        location /v1/ {{ js_content route.route; }}
        location @bench {{
            proxy_pass http://bench; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off; proxy_read_timeout 600s;
        }}
    }}
}}
"""
FIGURES = {"nonstream_c32": ("per_s", "proxy_cpu_us_per_request"), "stream_c16": ("per_s", "proxy_cpu_us_per_event")}


def start_njs(workdir: Path, backend_port: int, server_cores: set[int]) -> Nginx:
    prefix = workdir / "njs"
    prefix.mkdir()
    (prefix / "route.js").write_text(ROUTE_JS)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NJS_CONF.format(module=JS_MODULE, prefix=prefix, backend=backend_port, port=port))
    process = spawn_pinned([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(prefix)],
                           server_cores, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", 10, process)
    return Nginx(process, port)


def run(rounds: int, duration: float) -> dict[str, dict[str, dict[str, float]]]:
    """Medians per path and scenario: {path: {scenario: {figure: value}}}."""
    server_cores, client_cores = cores()
    with tempfile.TemporaryDirectory(prefix="aio-dataplane-") as tmp:
        workdir, backend_port = Path(tmp), free_port()
        argv = [arg.replace("{host}", "127.0.0.1").replace("{port}", str(backend_port)) for arg in backend_command()]
        backend = spawn_pinned(argv, server_cores, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proxies: list[Nginx] = []
        try:
            wait_http(f"http://127.0.0.1:{backend_port}/health", 30, backend)
            plain = start_nginx(workdir, backend_port, server_cores)
            if plain is None:
                raise SystemExit("nginx is not installed (apt-get install nginx libnginx-mod-http-js)")
            proxies = [plain, start_njs(workdir, backend_port, server_cores)]
            pin(client_cores)
            paths = {"direct": (backend_port, []), "nginx": (plain.port, plain.pids()),
                     "nginx+njs": (proxies[1].port, proxies[1].pids())}
            runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {s: [] for s in FIGURES} for p in paths}
            for _ in range(rounds):
                for scenario in FIGURES:
                    for path, (port, pids) in paths.items():
                        runs[path][scenario].append(proxy_bench.measure(port, scenario, duration, pids))
        finally:
            for proxy in proxies:
                proxy.stop()
            backend.terminate()
            backend.wait()
    return {path: {scenario: {key: statistics.median(r[key] for r in results) for key in FIGURES[scenario]}
                   for scenario, results in by_scenario.items()} for path, by_scenario in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    if not JS_MODULE.exists():
        raise SystemExit(f"{JS_MODULE} is missing (apt-get install libnginx-mod-http-js)")
    summary = run(args.rounds, args.duration)
    direct = summary["direct"]["nonstream_c32"]["per_s"]
    print(f"{'path':12}{'req/s c=32':>14}{'x direct':>10}{'CPU us/request':>16}{'streams/s c=16':>16}"
          f"{'CPU us/event':>14}")
    for path, figures in summary.items():
        nonstream, stream = figures["nonstream_c32"], figures["stream_c16"]
        print(f"{path:12}{nonstream['per_s']:>14.0f}{nonstream['per_s'] / direct:>9.2f}x"
              f"{nonstream['proxy_cpu_us_per_request']:>16.1f}{stream['per_s']:>16.0f}"
              f"{stream['proxy_cpu_us_per_event']:>14.2f}")


if __name__ == "__main__":
    main()

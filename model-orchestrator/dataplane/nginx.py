"""Running nginx for the data plane: check, start, reload, stop. Mechanism only.

nginx runs as the leader of its own process group, registered with the orchestrator's reaper, so it dies
with the orchestrator however that ends (its master gets the parent-death signal; the reaper kills the
workers should the master be killed). Its messages (``error_log stderr``) go to the orchestrator's log.

A reload rewrites the route table (and the configuration when asked), then sends SIGHUP: nginx starts new
workers on them and lets the old ones finish their requests. It has taken effect once a request on the
control socket reads the new table's generation (a new worker answered it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

import httpx

from core.supervision.process_tree import leader_exited, spawn_group_leader, terminate_tree
from core.supervision.reaper import Reaper
from model_orchestrator.dataplane.conf import TEMP_KINDS, Paths

log = logging.getLogger(__name__)

# Where distributions put ngx_http_js_module.so: Debian/Ubuntu's libnginx-mod-http-js, nginx.org's packages.
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules", "/usr/lib64/nginx/modules")
NJS_MODULE = "ngx_http_js_module.so"
_RELOAD_TIMEOUT = 10.0


class NginxError(RuntimeError):
    """nginx is missing, refused its configuration, or did not start or reload."""


def find_nginx(binary: str) -> str:
    """The nginx binary's path; NginxError naming the packages when there is none."""
    found = shutil.which(binary)
    if found is None:
        raise NginxError(f"settings.data_plane.kind is nginx, but there is no {binary!r} binary: install nginx "
                         "with njs (the playbook's base tag does, for a config that asks for it; by hand, on "
                         "Debian/Ubuntu 24.04+: apt install nginx libnginx-mod-http-js; Ubuntu 22.04: nginx.org's "
                         "nginx and nginx-module-njs), or set settings.data_plane.nginx")
    return found


def find_njs_module(configured: str | None) -> str | None:
    """The njs module to load: the configured one, else the first in MODULE_DIRS; None when none is there."""
    if configured is not None:
        return configured
    return next((str(Path(d) / NJS_MODULE) for d in MODULE_DIRS if (Path(d) / NJS_MODULE).is_file()), None)


def private_folder(root: Path) -> Paths:
    """Make ``root`` (mode 0700: it holds the service token) and the temp folders nginx writes."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    for kind in TEMP_KINDS:
        (root / kind).mkdir(mode=0o700, exist_ok=True)
    return Paths(root)


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by this user only."""
    scratch = path.with_name(path.name + ".new")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    scratch.replace(path)


class Nginx:
    """One nginx master and its workers."""

    def __init__(self, binary: str, paths: Paths, reaper: Reaper | None) -> None:
        self.binary = binary
        self.paths = paths
        self._reaper = reaper
        self._process: asyncio.subprocess.Process | None = None
        self._output: asyncio.Task[None] | None = None

    def _argv(self, *extra: str, conf: Path | None = None) -> list[str]:
        return [self.binary, "-p", str(self.paths.root), "-c", str(conf or self.paths.conf), *extra]

    async def install_conf(self, conf: str) -> None:
        """Make ``conf`` nginx's configuration once ``nginx -t`` accepts it; NginxError with nginx's words if it
        is refused, and the configuration in place stays (a reload then would read it, not the refused one)."""
        candidate = self.paths.root / "nginx.conf.candidate"
        write_private(candidate, conf)
        done = await asyncio.create_subprocess_exec(*self._argv("-t", "-q", conf=candidate),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await done.communicate()
        if done.returncode != 0:
            candidate.unlink(missing_ok=True)
            raise NginxError(f"nginx refused its configuration: {output.decode().strip()}")
        candidate.replace(self.paths.conf)

    async def start(self, conf: str, table: str, generation: int) -> None:
        write_private(self.paths.table, table)  # before the check: nginx reads it with its configuration
        await self.install_conf(conf)
        self._process = process = await spawn_group_leader(self._argv(), os.environ)
        if self._reaper is not None:
            self._reaper.register(process.pid)
        self._output = asyncio.create_task(self._forward_output(process), name="nginx-output")
        await self._until_generation(generation, "start")

    async def reload(self, table: str, generation: int, conf: str | None = None) -> None:
        """Serve ``table`` (and ``conf``, when given) from new workers; returns once they answer."""
        if conf is not None:
            await self.install_conf(conf)
        write_private(self.paths.table, table)
        if self._process is None or self._process.returncode is not None:
            raise NginxError("nginx is not running")
        self._process.send_signal(signal.SIGHUP)
        await self._until_generation(generation, "reload")

    async def stop(self, drain: float) -> None:
        """SIGQUIT (workers finish their requests, up to ``drain`` seconds), then the group ends."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGQUIT)
            await leader_exited(process, drain)
        await terminate_tree(process, 2.0)
        if self._reaper is not None:
            self._reaper.unregister(process.pid)
        if self._output is not None:
            await self._output

    async def _until_generation(self, generation: int, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RELOAD_TIMEOUT
        transport = httpx.AsyncHTTPTransport(uds=str(self.paths.control_socket))
        async with httpx.AsyncClient(transport=transport, timeout=1.0) as client:
            while loop.time() < deadline:
                if self._process is None or self._process.returncode is not None:
                    raise NginxError(f"nginx exited during its {what} (its messages are in this log)")
                with contextlib.suppress(httpx.HTTPError, OSError):
                    if (await client.get("http://nginx/generation")).text == str(generation):
                        return
                await asyncio.sleep(0.02)
        raise NginxError(f"nginx did not serve route table {generation} within {_RELOAD_TIMEOUT:g}s of its {what}")

    @staticmethod
    async def _forward_output(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            log.warning("nginx: %s", line.decode(errors="replace").rstrip())

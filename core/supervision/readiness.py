"""Is a service healthy yet: single health probes, and a start's wait until the first 200.

While the port is closed, a bare TCP connect every ``_POLL_MIN`` seconds (microseconds of work);
once it accepts, HTTP health probes from ``_POLL_MIN`` backing off to ``_POLL_MAX``, and at once
whenever the child prints a line. So detection adds milliseconds, not a poll period (llama-swap's
1 s loop adds up to a second per swap). Mechanism only: used by core/service_manager.py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import httpx

from core.config.schema import ModelSpec
from core.supervision.process_tree import out_of_fds, tcp_connects
from core.supervision.service_process import ServiceProcess
from core.supervision.start_errors import StartFailed

_POLL_MIN, _POLL_MAX = 0.005, 0.1


async def probe(spec: ModelSpec, client: httpx.AsyncClient, timeout: float = 5.0) -> bool:
    """True if ``spec``'s health endpoint answers 200 within ``timeout`` seconds.

    Raises only when the orchestrator is out of file descriptors: that is no verdict on the service.
    """
    try:
        response = await client.get(spec.base_url() + spec.health_path, timeout=timeout)
    except httpx.HTTPError as exc:
        if out_of_fds(exc):
            raise
        return False
    return response.status_code == 200


async def wait_healthy(spec: ModelSpec, process: ServiceProcess, probe: Callable[[float], Awaitable[bool]],
                       still_starting: Callable[[], None]) -> None:
    """``probe(timeout)`` until it says healthy; StartFailed (with the log's tail) when the process
    exits or ``startup_time`` passes. ``still_starting`` raises once the start is no longer current
    (a stop took over)."""
    deadline = time.monotonic() + spec.startup_time
    interval = _POLL_MIN
    while True:
        still_starting()
        if process.exited():
            raise StartFailed(process.with_log_tail(f"exited with status {process.exit_status()} during start"))
        if await tcp_connects(spec.host, spec.port, 1.0):
            if await probe(2.0):
                return
            interval = min(interval * 1.5, _POLL_MAX)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StartFailed(process.with_log_tail(f"not healthy after {spec.startup_time:g}s (startup_time)"))
        await process.output_or_exit(min(interval, remaining))

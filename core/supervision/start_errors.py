"""What ends a start: every exception becomes a StartFailed, and most count against the service.

Whatever a start raises ends it, so no service stays STARTING (holding its GPU share) for
good: its waiters get a StartFailed (the coordinator answers 503 with the message) and the
failure goes on record for the restart policy. The one exception is the orchestrator's own
exhaustion, EMFILE or ENFILE (spawning, opening the log, probing): it says nothing about
the service, so it is not counted, and the next request simply tries again.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from core.supervision.process_tree import out_of_fds


class StartFailed(Exception):
    """A start did not reach READY; the message says why and ends with recent log lines."""


@contextlib.contextmanager
def os_errors_as(what: str) -> Iterator[None]:
    """Turn an OSError into StartFailed("<what>: <reason>"), except our own lack of file descriptors."""
    try:
        yield
    except OSError as exc:
        if out_of_fds(exc):
            raise
        raise StartFailed(f"{what}: {exc.strerror or exc}") from exc


def start_failure(exc: Exception) -> tuple[StartFailed, bool]:
    """The StartFailed that waiters get for ``exc``, and whether it counts against the service."""
    exhausted = out_of_fds(exc)
    if exhausted is not None:
        code = errno.errorcode.get(exhausted.errno or 0, "?")
        return StartFailed(f"the orchestrator is out of file descriptors ({code}: {exhausted.strerror}); "
                           "not counted against the service, retry later"), False
    if isinstance(exc, StartFailed):
        return exc, True
    return StartFailed(f"unexpected error during start: {type(exc).__name__}: {exc}"), True

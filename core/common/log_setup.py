"""Logging configured once per process (orchestrator or model service), via dictConfig.

By default records go to stderr. With ``log_file`` (the orchestrator's ``--log-file``) they
go to that file instead, rotated by size (NAME.log.1 ... NAME.log.<backups>) so a long-lived
orchestrator cannot fill the disk the way a shell redirect would; the files are private
(mode 0600), as a record may carry a model's command line or a client's request.
"""

from __future__ import annotations

import contextlib
import io
import logging.config
import logging.handlers
import os
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
MAX_BYTES = 50 * 1024 * 1024
BACKUPS = 3


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files (the first and every one after a rollover) are 0600."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # also a file that existed with a wider mode
        except OSError:
            os.close(fd)
            raise
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # the handler closes it

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        # No backups kept: start the file again. The base class would reopen it for appending
        # and grow it forever (it rotates nothing when backupCount is 0).
        if self.stream:
            self.stream.close()
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.baseFilename, 0)
        self.stream = self._open()


def configure_logging(level: str = "info", log_file: str | Path | None = None, max_bytes: int = MAX_BYTES,
                      backups: int = BACKUPS) -> None:
    handler: dict[str, Any] = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # mode: only a folder we create
        handler = {"()": PrivateRotatingFileHandler, "formatter": "plain", "filename": str(path),
                   "maxBytes": max_bytes, "backupCount": backups, "encoding": "utf-8"}
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"main": handler},
        "root": {"handlers": ["main"], "level": level.upper()},
        "loggers": {
            "uvicorn.error": {"level": level.upper()},
            "httpx": {"level": "WARNING"},  # one INFO line per health probe otherwise
            "uvicorn.access": {"level": "INFO" if level.lower() == "debug" else "WARNING"},
        },
    })

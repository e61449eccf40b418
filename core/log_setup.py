"""Logging configured once per process (orchestrator or model service), via dictConfig."""

from __future__ import annotations

import logging.config

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn.error": {"level": level.upper()},
            "httpx": {"level": "WARNING"},  # one INFO line per health probe otherwise
            "uvicorn.access": {"level": "INFO" if level.lower() == "debug" else "WARNING"},
        },
    })

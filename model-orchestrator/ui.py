"""The dashboard: a static page at /ui that reads /status and /logs with the operator's key.

The page itself holds no data and is public; everything it shows comes from admin routes
called with the key the operator types in (kept in the browser's session storage only).
No build step, no CDN: every file it loads is served from model-orchestrator/ui/.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "ui"


def mount_ui(app: FastAPI) -> None:
    """``/ui/`` serves the dashboard's files; ``/`` redirects there."""
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

"""ParkClient: the calls it sends to park and restore a model, and how they end (no processes).

The model's server is an in-process ASGI app that records what it receives (httpx's ASGI
transport), so the calls are built and parsed exactly as over a socket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config.load import config_from_dict
from core.supervision.park_client import ParkClient, ParkFailed

WEIRD = 'tiny "quoted" \\ model'  # a name a JSON body must keep as one string


class Recorder:
    """A model server that answers every call 200 with ``answer`` and keeps what it was sent."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.answer = answer

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls.append((scope["method"], scope["path"], json.loads(body) if body else None))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(self.answer).encode()})


def client_for(park: dict[str, Any], server: Recorder) -> ParkClient:
    config = config_from_dict({"models": {WEIRD: {"type": "text", "command": "serve", "port": 8001, "park": park}}},
                              Path("models.yaml"))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server))
    return ParkClient(config.models[WEIRD], http, "token")


def test_placeholders_are_filled_in_the_parsed_body_so_any_model_name_stays_one_string() -> None:
    # #19: {model} was filled into the JSON text, so a quote in the name broke the body (a
    # ValueError before the call's error handling: the park task died and left the model PARKING).
    server = Recorder({"pinned_host_bytes": 7})
    calls = {"park": [{"path": "/sleep?level={level}", "body": {"model": "{model}", "tags": ["{model}", 1]}}],
             "restore": [{"path": "/wake_up"}]}
    outcome = asyncio.run(client_for({"calls": calls}, server).park(2))
    assert server.calls == [("POST", "/sleep", {"model": WEIRD, "tags": [WEIRD, 1]})]
    assert outcome.host_bytes == 7


def test_a_call_past_park_timeout_fails_the_park() -> None:
    class Slow(Recorder):
        async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            await asyncio.sleep(30)

    calls = {"park": [{"path": "/sleep"}], "restore": [{"path": "/wake_up"}]}
    client = client_for({"calls": calls, "timeout": 0.05}, Slow({}))
    with pytest.raises(ParkFailed, match=r"park took longer than park.timeout \(0.05s\)"):
        asyncio.run(client.park(1))

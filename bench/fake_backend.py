"""A fast fake OpenAI backend for benchmarks: raw ASGI on uvicorn + uvloop + httptools.

    python bench/fake_backend.py --port 8001 [--host 127.0.0.1] [--startup-delay S]

POST /v1/chat/completions answers like a model server. With "stream": true it sends
``bench_chunks`` SSE events (default 64), ``bench_interval_ms`` apart (default 0), each
stamped with the backend's CLOCK_MONOTONIC send time in ns (``"t"``), so a client on
the same machine can measure the latency every hop adds to every chunk. GET /health
answers 200 once listening. No framework, so the backend itself costs as little as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from typing import Any

STARTED_NS = time.monotonic_ns()  # first thing (after the stdlib): the swap benchmark charges the service from here
LISTENING_NS = 0  # set right after listen(): from then on connections are accepted
_HEADERS_JSON = [(b"content-type", b"application/json")]
_HEADERS_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

# Responses are serialised per request and per chunk, as a real server does (vLLM builds a
# pydantic object per chunk, which costs more): a backend that only copies fixed bytes
# would make any proxy look worse than it is in front of a real model server.


def _completion() -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello " * 20},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 20, "total_tokens": 28},
    }).encode()


def _chunk(created: int) -> bytes:
    return b"data: " + json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": "bench",
        "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}],
        "t": time.monotonic_ns(),
    }).encode() + b"\n\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/health":
        timings = {"status": "ready", "started_ns": STARTED_NS, "listening_ns": LISTENING_NS}
        await _respond(send, 200, _HEADERS_JSON, json.dumps(timings).encode())
    elif scope["method"] == "POST" and scope["path"].startswith("/v1/"):
        request = json.loads(body) if body else {}
        if request.get("stream"):
            await _stream(send, int(request.get("bench_chunks", 64)), float(request.get("bench_interval_ms", 0)))
        else:
            await _respond(send, 200, _HEADERS_JSON, _completion())
    else:
        await _respond(send, 404, _HEADERS_JSON, b'{"error":{"message":"not found","type":"invalid_request_error"}}')


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Any, chunks: int, interval_ms: float) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS_SSE})
    created = int(time.time())
    for _ in range(chunks):
        if interval_ms:
            await asyncio.sleep(interval_ms / 1000)
        await send({"type": "http.response.body", "body": _chunk(created), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def main() -> None:
    global LISTENING_NS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds of pretend model loading")
    args = parser.parse_args()
    time.sleep(args.startup_delay)  # before binding, like a server that loads first

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    LISTENING_NS = time.monotonic_ns()
    # Server.run(sockets=...) keeps the socket's TCP family; uvicorn's fd= option would wrap it
    # as AF_UNIX, the loop would skip TCP_NODELAY, and Nagle would add 40 ms to every response.
    config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on", access_log=False,
                            log_level="warning", server_header=False, date_header=False)
    uvicorn.Server(config).run(sockets=[sock, *_service_socket()])


def _service_socket() -> list[socket.socket]:
    """The unix socket the orchestrator names for the nginx data plane, as a model service listens on it
    (core/runtime/listeners.py; this script runs without the repository on its path)."""
    path = os.environ.pop("AIO_SERVICE_SOCKET", None)
    if not path:
        return []
    if os.path.exists(path):
        os.unlink(path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    os.chmod(path, 0o600)
    unix.listen(2048)
    return [unix]


if __name__ == "__main__":
    main()

"""A raw-socket upstream for proxy tests: misbehaves in ways a real HTTP server will not.

    python tests/fakes/raw_upstream.py [--host H] --port N

The path picks the behaviour (the orchestrator reaches it as /upstream/<model>/<path>):

* ``GET /health``: 200.
* ``.../reset``: reads the request, then resets the connection (RST, no answer).
* ``.../garbage``: answers a line that is not an HTTP status line, then closes.
* ``.../stall``: never answers.
* ``.../stall-stream``: starts an event stream, sends one event, then goes silent.
* anything else: 200 with what it received as JSON (``headers`` as [name, value] pairs,
  ``body_bytes``, the body's ``model``) and ``token``, its AIO_SERVICE_TOKEN; its own answer carries the
  hop-by-hop header ``X-Upstream-Hop``, named in its ``Connection:`` header.

Standard library only; one request after another on each connection (keep-alive).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
from typing import Any


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
            path = request_line.split(" ")[1]
            headers = [line.split(":", 1) for line in lines]
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            body = await reader.readexactly(length)
            if not await respond(path, [[k, v.strip()] for k, v in headers], body, writer):
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def respond(path: str, headers: list[list[str]], body: bytes, writer: asyncio.StreamWriter) -> bool:
    """Answer one request; False when the connection is done."""
    if path.endswith("/reset"):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        return False
    if path.endswith("/garbage"):
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        return False
    if path.endswith("/stall"):
        await asyncio.Event().wait()
    if path.endswith("/stall-stream"):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"10\r\ndata: {\"n\": 1}\n\n\r\n")
        await writer.drain()
        await asyncio.Event().wait()
    answer = {"path": path, "headers": headers, "body_bytes": len(body), "model": _model(body),
              "token": os.environ.get("AIO_SERVICE_TOKEN")}
    payload = json.dumps(answer).encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive, X-Upstream-Hop\r\n"
                 b"x-upstream-hop: secret\r\nx-upstream-end: kept\r\ncontent-length: %d\r\n\r\n" % len(payload)
                 + payload)
    await writer.drain()
    return True


def _model(body: bytes) -> Any:
    try:
        return json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    asyncio.run(main(options.host, options.port))

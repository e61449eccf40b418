"""The benchmarks' load generator behaves as a client: a server's ``Connection: close`` is not an error."""

from __future__ import annotations

import asyncio

from bench import loadgen

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n%s\r\nok"


class _ClosesEveryOther(asyncio.Protocol):
    """Answers keep-alive requests, and says ``Connection: close`` (then closes) on every second one, as nginx
    does after ``keepalive_requests``."""

    def __init__(self, served: list[int]) -> None:
        self.served = served
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):  # the requests have no body
            self.count += 1
            self.served.append(1)
            last = self.count % 2 == 0
            self.transport.write(_ANSWER % (b"Connection: close\r\n" if last else b""))
            if last:
                self.transport.close()
                return


def test_a_connection_the_server_closes_is_reopened_without_an_error() -> None:
    async def scenario() -> tuple[loadgen.Result, int]:
        served: list[int] = []
        server = await asyncio.get_running_loop().create_server(lambda: _ClosesEveryOther(served), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        async with server:
            result = await loadgen.run("127.0.0.1", port, request, concurrency=2, duration=0.3)
        return result, len(served)

    result, served = asyncio.run(scenario())
    assert result.errors == 0
    assert result.completed >= 10 and result.completed == served  # every answer counted, over many connections

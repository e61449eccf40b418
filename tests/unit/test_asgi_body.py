"""core.common.asgi.read_body: limits, the body deadline, disconnects (ASGI level; socket-level tests in
tests/integration/test_proxy_hardening.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from core.common.asgi import BodyRefused, ClientGone, Message, Receive, read_body


def messages(parts: Iterable[Message], then_stall: bool = False) -> Receive:
    queue = list(parts)

    async def receive() -> Message:
        if not queue and then_stall:
            await asyncio.Event().wait()
        return queue.pop(0)

    return receive


def body_parts(*chunks: bytes) -> list[Message]:
    return [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]


def test_chunks_are_joined_and_a_single_message_is_passed_through() -> None:
    assert asyncio.run(read_body(messages(body_parts(b"ab", b"", b"cd")), 10, 5)) == b"abcd"
    assert asyncio.run(read_body(messages(body_parts(b"abcd")), 4, 5)) == b"abcd"


@pytest.mark.parametrize("chunks", [(b"abcde",), (b"abc", b"de")])
def test_past_the_limit_is_413(chunks: tuple[bytes, ...]) -> None:
    with pytest.raises(BodyRefused) as info:
        asyncio.run(read_body(messages(body_parts(*chunks)), 4, 5))
    assert (info.value.status, info.value.code) == (413, "body_too_large")


def test_a_declared_length_over_the_limit_is_refused_without_reading() -> None:
    with pytest.raises(BodyRefused) as info:
        asyncio.run(read_body(messages([]), 4, 5, declared=5))
    assert info.value.status == 413


def test_a_disconnect_is_client_gone() -> None:
    with pytest.raises(ClientGone):
        asyncio.run(read_body(messages([*body_parts(b"a", b"b")[:1], {"type": "http.disconnect"}]), 10, 5))


def test_a_stalled_body_is_408_and_the_task_stays_usable() -> None:
    async def scenario() -> None:
        with pytest.raises(BodyRefused) as info:
            await read_body(messages(body_parts(b"a", b"b")[:1], then_stall=True), 10, 0.2)
        assert (info.value.status, info.value.code) == (408, "body_timeout")
        await asyncio.sleep(0)  # a loop turn, where a cancel left pending by the deadline would land

    asyncio.run(scenario())


def test_a_cancel_from_elsewhere_is_not_a_408() -> None:
    async def scenario() -> None:
        waiting = asyncio.Event()

        async def stalled_receive() -> Message:
            waiting.set()
            await asyncio.Event().wait()
            raise AssertionError("a stalled client sends nothing")

        task = asyncio.create_task(read_body(stalled_receive, 10, 5))
        await waiting.wait()  # the reader is blocked in receive(), well before its 5 s deadline
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())

"""Cancellation-safe helpers: waiters that give up never cancel the work, nothing is swallowed."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from typing import Any, NoReturn

import pytest

from core.common.aio import done_future, joined, wait_all
from core.supervision.process_tree import leader_exited, tcp_connects


def test_cancelling_a_joined_future_leaves_the_task_running() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(asyncio.sleep(0.01, result="done"))
        waiter = joined(task)
        waiter.cancel()
        assert await task == "done"
        assert await joined(task) == "done"
    asyncio.run(main())


def test_a_joined_future_follows_the_tasks_cancellation() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(asyncio.sleep(10))
        waiter = joined(task)
        task.cancel()
        await asyncio.wait({waiter})
        assert waiter.cancelled()
    asyncio.run(main())


def test_wait_all_ignores_errors_and_never_cancels_what_it_waits_for() -> None:
    async def fail() -> NoReturn:
        raise RuntimeError("a stop that failed")

    async def main() -> None:
        await wait_all([fail(), asyncio.sleep(0)])  # no error raised
        slow = asyncio.ensure_future(asyncio.sleep(0.05, result="stopped"))
        waiter = asyncio.ensure_future(wait_all([slow]))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.wait({waiter})
        assert waiter.cancelled() and await slow == "stopped"
        await wait_all([])
        assert done_future().done()
    asyncio.run(main())


def test_leader_exited_without_a_pidfd_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fds(pid: int) -> NoReturn:
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(os, "pidfd_open", no_fds)

    async def main() -> None:
        slow = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(5)")
        assert not await leader_exited(slow, 0.1)
        slow.kill()
        assert await leader_exited(slow, 5)
        await slow.wait()
    asyncio.run(main())


def test_tcp_connects() -> None:
    async def main() -> None:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            assert await tcp_connects("127.0.0.1", port, 1.0)
        assert not await tcp_connects("127.0.0.1", port, 1.0)  # closed now: refused
    asyncio.run(main())


def test_tcp_connects_raises_when_we_are_out_of_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_fds(*args: Any, **kwargs: Any) -> NoReturn:
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(asyncio, "open_connection", no_fds)
    with pytest.raises(OSError, match="Too many open files"):
        asyncio.run(tcp_connects("127.0.0.1", 9, 1.0))

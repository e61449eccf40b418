"""core/supervision/log_capture.py: private log files, rotation while running, bounded followers."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.common.log_setup import configure_logging
from core.supervision.log_capture import Follower, ServiceLog, TooManyFollowers


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def drain(queue: asyncio.Queue[str]) -> list[str]:
    lines = []
    while not queue.empty():
        lines.append(queue.get_nowait())
    return lines


def test_files_and_the_folder_we_create_are_private(tmp_path: Path) -> None:
    log = ServiceLog("m", tmp_path / "logs" / "m.log")
    log.open("python server.py")
    log.write("hello")
    log.close()
    assert mode(tmp_path / "logs") == 0o700
    assert mode(tmp_path / "logs" / "m.log") == 0o600
    assert (tmp_path / "logs" / "m.log").read_text().splitlines()[1] == "hello"


def test_the_header_masks_secrets(tmp_path: Path) -> None:
    log = ServiceLog("m", tmp_path / "m.log")
    log.open("python server.py --hf-token hf_abc --port 8001")
    log.close()
    assert "hf_abc" not in (tmp_path / "m.log").read_text()
    assert log.tail(1)[0].endswith("python server.py --hf-token *** --port 8001 ===")


def test_an_existing_file_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    path = folder / "m.log"
    path.write_text("old start\n")
    path.chmod(0o644)
    log = ServiceLog("m", path)
    log.open("again")
    log.close()
    assert mode(path) == 0o600
    assert path.read_text().startswith("old start\n")
    assert mode(folder) == 0o755  # a folder that existed keeps its mode


def test_rotates_while_running_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    log = ServiceLog("m", path, max_bytes=1000, backups=2)
    log.open("start")
    for i in range(100):
        log.write(f"line {i:03d} " + "x" * 40)  # 50 bytes with the newline
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["m.log", "m.log.1", "m.log.2"]  # the oldest was dropped, not kept as m.log.3
    for name in files:
        assert (tmp_path / name).stat().st_size <= 1000
        assert mode(tmp_path / name) == 0o600
    newest = path.read_text().splitlines()
    assert newest[-1].startswith("line 099")
    previous = (tmp_path / "m.log.1").read_text().splitlines()
    assert int(previous[-1].split()[1]) + 1 == int(newest[0].split()[1])  # no line lost between files


def test_rotates_a_big_file_at_open(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("x" * 2000)
    log = ServiceLog("m", path, max_bytes=1000, backups=1)
    log.open("start")
    log.close()
    assert (tmp_path / "m.log.1").read_text() == "x" * 2000
    assert path.read_text().startswith("=== ")


def test_no_backups_starts_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    log = ServiceLog("m", path, max_bytes=500, backups=0)
    log.open("start")
    for i in range(50):
        log.write(f"line {i} " + "y" * 40)
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["m.log"]
    assert path.stat().st_size <= 500
    assert "line 49" in path.read_text()


def test_a_vanished_folder_does_not_stop_the_log(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    log = ServiceLog("m", folder / "m.log", max_bytes=200, backups=1)
    log.open("start")
    (folder / "m.log").unlink()
    folder.rmdir()
    for i in range(20):  # rotation fails (nothing to rename), writing goes on in memory
        log.write(f"line {i} " + "z" * 30)
    assert log.tail(1) == ["line 19 " + "z" * 30]
    log.close()


def test_followers_are_capped(tmp_path: Path) -> None:
    log = ServiceLog("m", None, max_followers=2)
    first, _ = log.follow(), log.follow()
    with pytest.raises(TooManyFollowers):
        log.follow()
    log.unfollow(first)
    log.follow()  # a slot came free
    log.unfollow(asyncio.Queue())  # a foreign queue is ignored


def test_a_slow_follower_holds_bounded_text_and_learns_what_it_lost() -> None:
    log = ServiceLog("m", None, follower_chars=1000)
    follower = log.follow()
    for i in range(1000):  # 100 KB written, the reader reads nothing
        log.write(f"{i:04d} " + "a" * 94)
    assert follower.pending_chars <= 1000
    got = drain(follower)
    assert got[:10] == [f"{i:04d} " + "a" * 94 for i in range(10)]
    assert got[10:] == ["[... 990 lines dropped: reader too slow ...]"]  # told once it caught up
    log.write("after")
    assert drain(follower) == ["after"]
    assert follower.pending_chars == 0


def test_the_marker_stands_where_lines_are_missing() -> None:
    follower = Follower(max_chars=100)
    for i in range(5):
        follower.offer(f"{i}" * 39)  # 40 chars each with the newline: room for 2
    assert follower.get_nowait() == "0" * 39
    assert follower.get_nowait() == "1" * 39  # the last line in the queue: the marker follows at once
    assert follower.get_nowait() == "[... 3 lines dropped: reader too slow ...]"
    follower.offer("next")
    assert drain(follower) == ["next"]


def test_a_slow_reader_resumes_after_half_is_drained() -> None:
    follower = Follower(max_chars=100)
    for i in range(5):
        follower.offer(f"{i}" * 19)  # 20 chars each with the newline: five fit
    follower.offer("5" * 19)  # dropped: full
    follower.get_nowait()
    follower.offer("6" * 19)  # 80 pending: below the limit, but dropping goes on until half is free
    follower.get_nowait()
    follower.get_nowait()
    follower.offer("7" * 19)  # 40 pending + 20 > 50: still dropping
    follower.get_nowait()
    follower.offer("8" * 19)  # 20 pending: room again, after the marker
    assert drain(follower) == ["4" * 19, "[... 3 lines dropped: reader too slow ...]", "8" * 19]


def test_pump_splits_lines_cuts_long_ones_and_signals_activity() -> None:
    async def scenario() -> tuple[list[str], bool, list[str]]:
        log = ServiceLog("m", None)
        follower = log.follow()
        reader = asyncio.StreamReader()
        reader.feed_data(b"one\r\ntwo\n" + b"p" * 20_000 + b"\nlast")
        reader.feed_eof()
        await log.pump(reader)
        return log.tail(), log.activity.is_set(), drain(follower)

    tail, active, followed = asyncio.run(scenario())
    assert tail[:2] == ["one", "two"] and tail[-1] == "last"
    assert all(len(line) <= 16 * 1024 for line in tail)
    assert active
    assert followed == tail


# --- the orchestrator's own log (core/common/log_setup.py) ----------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_orchestrator_log_file_is_private_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "run" / "orchestrator.log"
    configure_logging("info", log_file=path, max_bytes=1000, backups=2)
    for i in range(200):
        logging.getLogger("test").info("record %03d %s", i, "r" * 40)
    assert sorted(p.name for p in path.parent.iterdir()) == ["orchestrator.log", "orchestrator.log.1",
                                                             "orchestrator.log.2"]
    for file in path.parent.iterdir():
        assert mode(file) == 0o600, file  # the files made by a rollover too
        assert file.stat().st_size <= 1000
    assert mode(path.parent) == 0o700
    assert "record 199" in path.read_text()


@pytest.mark.usefixtures("restore_logging")
def test_orchestrator_log_without_backups_starts_again(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.log"
    configure_logging("info", log_file=path, max_bytes=500, backups=0)
    for i in range(100):
        logging.getLogger("test").info("record %03d %s", i, "r" * 40)
    assert [p.name for p in tmp_path.iterdir()] == ["orchestrator.log"]
    assert path.stat().st_size <= 500
    assert "record 099" in path.read_text()

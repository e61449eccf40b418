"""Which errors end a start as the service's failure, and which (running out of fds) do not."""

from __future__ import annotations

import errno

import httpx
import pytest

from core.supervision.process_tree import out_of_fds
from core.supervision.start_errors import StartFailed, os_errors_as, start_failure


def wrapped(inner: BaseException) -> httpx.ConnectError:
    """An error the way httpx raises it: mapped from httpcore's, mapped from the OSError."""
    try:
        try:
            raise inner
        except OSError as exc:
            raise httpx.ConnectError("All connection attempts failed") from exc
    except httpx.ConnectError as outer:
        return outer


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_out_of_fds_is_found_through_wrapping(code: int) -> None:
    inner = OSError(code, "no fds")
    assert out_of_fds(inner) is inner
    assert out_of_fds(wrapped(inner)) is inner


def test_other_errors_are_not_out_of_fds() -> None:
    assert out_of_fds(OSError(errno.EACCES, "Permission denied")) is None
    assert out_of_fds(wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))) is None
    assert out_of_fds(RuntimeError("boom")) is None


def test_a_cycle_of_causes_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__cause__, second.__cause__ = second, first
    assert out_of_fds(first) is None


def test_running_out_of_fds_does_not_count_against_the_service() -> None:
    failure, counts = start_failure(wrapped(OSError(errno.EMFILE, "Too many open files")))
    assert not counts
    assert str(failure).startswith("the orchestrator is out of file descriptors (EMFILE: Too many open files)")


def test_start_failed_passes_through_and_counts() -> None:
    original = StartFailed("not healthy after 5s")
    assert start_failure(original) == (original, True)


def test_an_unexpected_error_is_named_and_counts() -> None:
    failure, counts = start_failure(KeyError("port"))
    assert counts and str(failure) == "unexpected error during start: KeyError: 'port'"


def test_os_errors_become_start_failed_with_the_reason() -> None:
    with pytest.raises(StartFailed, match=r"cannot open log file /x/y\.log: Permission denied") as info, \
            os_errors_as("cannot open log file /x/y.log"):
        raise PermissionError(errno.EACCES, "Permission denied", "/x/y.log")
    assert isinstance(info.value.__cause__, PermissionError)


def test_running_out_of_fds_is_left_as_it_is() -> None:
    with pytest.raises(OSError, match="Too many open files"), os_errors_as("cannot run 'python'"):
        raise OSError(errno.EMFILE, "Too many open files")

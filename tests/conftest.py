"""Suite-wide rules.

* `gpu` tests run only where an NVIDIA GPU is visible; they skip elsewhere.
* In CI (``CI`` set, as .ci/run does) any other skip is a failure: a test that needs a tool
  must get it from the test setup (scripts/test.sh), not pass silently by skipping.
* No test leaves a process running. pytest becomes a child subreaper, so whatever a test
  starts re-parents to pytest when its parent dies instead of escaping to init; after each
  test, and again after every fixture is torn down, the processes still running below
  pytest are listed, and any that do not exit within a short grace period fail the test
  (or the session), named by pid and command line, and are killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Generator, Iterable, Iterator

import psutil
import pytest

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
LEFTOVER_GRACE = 10.0  # seconds a process may take to exit after its test or fixture stopped it
_LEFTOVERS = pytest.StashKey[list[str]]()


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


# The files that take a minute or more, longest first (measured: `--durations`). scripts/test.sh
# runs two worker processes that take whole files in collection order (--no-loadscope-reorder;
# xdist's default puts files with many tests first, which left the one-test guide and scaffold
# runs for the end, alone). Longest first keeps the tail short; a new file that takes a
# minute or more belongs here. The rest keep their order.
SLOW_FILES = (
    "tests/provisioning/test_gpu_rehearsal.py",
    "tests/provisioning/test_playbook.py",
    "tests/models/test_text_vllm_lifecycle.py",
    "tests/models/test_text_vllm.py",
    "tests/integration/test_adding_models_doc.py",
    "tests/models/test_text_park.py",
    "tests/integration/test_scaffold.py",
    "tests/models/test_text_vllm_apis.py",
    "tests/provisioning/test_gpu_stack_resolve.py",
    "tests/models/test_torch291_services.py",
    "tests/models/test_musicgen.py",
    "tests/models/test_flux.py",
)


def _slow_rank(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_slow_rank)  # stable: the other files keep their order
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi -L found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- in CI, a skip is a failure (gpu tests excepted) ----------------------------------------------


def _skips_fail() -> bool:
    return bool(os.environ.get("CI"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                             pytest.TestReport]:
    report = yield
    if _skips_fail() and report.skipped and not hasattr(report, "wasxfail") and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (only `gpu` tests may skip there): {_skip_reason(report)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport,
                                                                         pytest.CollectReport]:
    report = yield  # a module-level pytest.skip / importorskip skips a whole file
    if _skips_fail() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (only `gpu` tests may skip there): {_skip_reason(report)}"
    return report


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


# --- no process outlives its test -----------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    session.config.stash[_LEFTOVERS] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test whose own fixtures and body left a process running.

    Autouse and defined here, so it is set up before (and torn down after) the test's other
    function-scoped fixtures; processes of wider-scoped fixtures already run before the test
    and are excluded (the session-end check covers them).
    """
    before = {_identity(p) for p in live_descendants()}
    yield
    leftovers = stop_leftovers([p for p in live_descendants() if _started_by_the_test(p, before)])
    if leftovers:
        pytest.fail(f"{request.node.nodeid} left processes running (now killed):\n" + "\n".join(leftovers))


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish, which tears the session fixtures down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = stop_leftovers(live_descendants())
    if leftovers:
        session.config.stash[_LEFTOVERS] = leftovers
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    leftovers = config.stash.get(_LEFTOVERS, [])
    if leftovers:
        terminalreporter.section("processes left running after the session (now killed)", red=True)
        for line in leftovers:
            terminalreporter.line(line, red=True)


def live_descendants() -> list[psutil.Process]:
    """Processes below this one that are still running (a zombie has exited already)."""
    below = psutil.Process().children(recursive=True)
    _note_grandchildren(below)
    _reap_orphans()
    return [p for p in below if _running(p)]


def stop_leftovers(procs: Iterable[psutil.Process]) -> list[str]:
    """Wait up to LEFTOVER_GRACE for ``procs`` to exit; kill and describe ("pid N: cmdline") the rest."""
    pending = list(procs)
    deadline = time.monotonic() + LEFTOVER_GRACE
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for exits: a stopped service may take a moment to go
        pending = [p for p in pending if _running(p)]
    described = [f"pid {p.pid}: {_cmdline(p)}" for p in pending]
    for proc in pending:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _reap_orphans()
    return described


# Processes seen below pytest with some other parent. When one of them later shows up as
# pytest's own child, it was adopted (its parent died first), so no Popen here owns it and
# pytest, as its subreaper, must collect its exit status. Pytest's own children are never
# reaped here: a Popen (or asyncio's child watcher) collects those, and reaping under it would
# lose the exit code. An orphan adopted before it was ever seen stays a zombie: harmless.
_SEEN_AS_GRANDCHILD: set[tuple[int, float]] = set()


def _note_grandchildren(below: Iterable[psutil.Process]) -> None:
    me = os.getpid()
    for proc in below:
        with contextlib.suppress(psutil.Error):
            if proc.ppid() != me:
                _SEEN_AS_GRANDCHILD.add(_identity(proc))


def _reap_orphans() -> None:
    """Collect the exit status of adopted orphans that have exited (see _SEEN_AS_GRANDCHILD)."""
    for proc in psutil.Process().children():
        identity = _identity(proc)
        if identity in _SEEN_AS_GRANDCHILD and not _running(proc):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)
            _SEEN_AS_GRANDCHILD.discard(identity)


def _started_by_the_test(proc: psutil.Process, before: set[tuple[int, float]]) -> bool:
    """New since the test began, and not below a process that was already running then: a
    wider-scoped fixture's orchestrator starts model services on demand during tests, and
    those belong to the fixture (the session-end check covers them). An orphan re-parents
    to pytest itself, so a process the test leaked is still caught."""
    if _identity(proc) in before:
        return False
    with contextlib.suppress(psutil.Error):
        return not any(_identity(parent) in before for parent in proc.parents())
    return True


def _identity(proc: psutil.Process) -> tuple[int, float]:
    with contextlib.suppress(psutil.Error):
        return proc.pid, proc.create_time()
    return proc.pid, 0.0


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "(exited)"

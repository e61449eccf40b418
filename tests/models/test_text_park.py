"""Parking the text service (core/runtime/parking.py): ``/state``, ``POST /offload``, ``POST /restore``.

* vLLM on vllm-cpu has no sleep mode: the service says it cannot park, ``/offload`` answers 501
  (the orchestrator then stops it instead) and it goes on serving.
* The transformers engine parks on the CPU too (its weights moved to host memory, or dropped and
  read from disk again): refused while parked, the same greedy answer once restored.
* vLLM on CUDA (``gpu``): sleep levels 1 and 2 give the GPU memory back and wake to the same
  greedy answer; the seconds each wake takes are printed.

Each test owns its service process.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.markers import vllm_import_warnings
from tests.models import text_cases
from tests.models.text_cases import TextService, text_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
# Importing vLLM (and torch under it) in this process warns about their own deprecations; not this project's concern.


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.vllm.tiny import build

    return build(tmp_path_factory.mktemp("models") / "tiny-qwen")


def vllm_args(model: Path) -> list[str]:
    return ["--model", str(model), "--engine", "vllm", "--served-model-name", "tiny", "--max-model-len", "1024"]


# --- the park routes -----------------------------------------------------------------------------


def state(service: TextService) -> dict[str, Any]:
    reply = httpx.get(service.url + "/state", timeout=30)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def offload(service: TextService, level: int) -> httpx.Response:
    return httpx.post(service.url + "/offload", params={"level": level}, timeout=300)


def restore(service: TextService) -> dict[str, Any]:
    reply = httpx.post(service.url + "/restore", timeout=300)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def greedy(service: TextService) -> str:
    """A greedy answer long enough that wrong weights or a stale cache would change it."""
    reply = text_cases.chat(service.url, messages=PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 24, body
    return str(body["choices"][0]["message"]["content"])


def park_and_check(service: TextService, level: int) -> dict[str, Any]:
    """Park at ``level``; while parked the service refuses requests and says why. The park's answer."""
    reply = offload(service, level)
    assert reply.status_code == 200, reply.text
    parked = dict(reply.json())
    assert (parked["state"], parked["level"], parked["can_park"]) == ("parked", level, True), parked
    assert state(service)["state"] == "parked"
    refused = text_cases.chat(service.url, messages=PROMPT, max_tokens=1)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "model_not_ready" and "parked" in refused.json()["error"]["message"]
    assert httpx.get(service.url + "/health", timeout=30).status_code == 503
    return parked


def restore_and_check(service: TextService) -> dict[str, Any]:
    restored = restore(service)
    assert (restored["state"], restored["level"]) == ("ready", None), restored
    assert httpx.get(service.url + "/health", timeout=30).status_code == 200
    return restored


# --- vLLM on vllm-cpu: no sleep mode ---------------------------------------------------------------


def _vllm_distributions() -> list[str]:
    return importlib.metadata.packages_distributions().get("vllm", [])


def test_vllm_cpu_cannot_park_says_why_and_keeps_serving(tiny_text: Path) -> None:
    if not _vllm_distributions():
        pytest.skip("vLLM is not installed (pip install -r models/requirements-cpu.txt)")
    if "vllm-cpu" not in _vllm_distributions():
        pytest.skip("a GPU build of vLLM has a sleep mode: test_vllm_sleeps_and_wakes_to_the_same_answer covers it")
    with text_service(*vllm_args(tiny_text), "--enforce-eager") as service:
        before = greedy(service)
        reported = state(service)
        assert (reported["state"], reported["can_park"], reported["level"]) == ("ready", False, None), reported
        assert reported["reason"].startswith("vLLM sleep mode is not supported on this platform (vllm-cpu"), reported
        for level in (1, 2):
            reply = offload(service, level)
            assert reply.status_code == 501, reply.text
            error = reply.json()["error"]
            assert error["code"] == "park_unsupported" and error["message"] == reported["reason"], error
        assert state(service)["state"] == "ready"  # nothing happened to the model
        assert greedy(service) == before
        assert httpx.post(service.url + "/restore", timeout=30).status_code == 409  # not parked
        service.log.wait_for(r"vLLM sleep mode: vLLM sleep mode is not supported")  # and vLLM was built without it


# --- the transformers engine ------------------------------------------------------------------------


def test_transformers_parks_at_both_levels_and_answers_the_same(tiny_text: Path) -> None:
    pytest.importorskip("transformers")
    with text_service("--model", str(tiny_text), "--engine", "transformers", "--device", "cpu") as service:
        before = greedy(service)
        assert state(service)["can_park"] is True
        parked = park_and_check(service, 1)
        assert parked["pinned_host_bytes"] > 0, parked  # the weights wait in host memory
        restore_and_check(service)
        assert greedy(service) == before
        park_and_check(service, 2)  # the weights dropped: the restore reads them from disk again
        restore_and_check(service)
        assert greedy(service) == before


# --- vLLM on CUDA: sleep mode ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_vllm_sleeps_and_wakes_to_the_same_answer(tiny_text: Path) -> None:
    """CUDA graphs on (no --enforce-eager), as in production: they are kept across sleep."""
    from core.supervision.service_park import gpu_bytes_of_tree

    with text_service(*vllm_args(tiny_text), env={"AIO_VRAM_GB": "4"}, timeout=600) as service:
        before = greedy(service)
        ready = state(service)
        assert ready["can_park"] is True and ready["vram_bytes"] > 0, ready
        held = gpu_bytes_of_tree(service.proc.pid)
        assert held, "NVML sees no GPU memory in the service's processes"
        # The engine core (which makes the pinned copies) runs with the pinned-allocator bound (#20).
        import psutil

        engines = [p for p in psutil.Process(service.proc.pid).children(recursive=True)
                   if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
        assert engines, "no vLLM engine core process below the service"
        conf = engines[0].environ().get("PYTORCH_ALLOC_CONF", "")
        assert "pinned_max_round_threshold_mb:" in conf and "pinned_max_cached_size_mb:" in conf, conf
        for level in (1, 2, 1):
            parked = park_and_check(service, level)
            assert parked["vram_bytes"] == 0 and (parked["pinned_host_bytes"] > 0) == (level == 1), parked
            asleep = gpu_bytes_of_tree(service.proc.pid)
            assert asleep is not None and asleep < held / 2, (level, asleep, held)
            restored = restore_and_check(service)
            print(f"vLLM level {level}: park {parked['seconds']:.2f}s, wake + warm-up {restored['seconds']:.2f}s")
            assert greedy(service) == before, f"a different answer after waking from level {level}"


# --- the sleep and wake sequences, against AsyncLLM's real signatures (runs on vllm-cpu too) -----------


class RecordingEngine:
    """Stands in for AsyncLLM where its sleep mode cannot run: records each call, checked against the
    real method's signature, and answers as a sleeping engine would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.sleeping_tags: set[str] = set()

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        import inspect

        from vllm.v1.engine.async_llm import AsyncLLM

        inspect.signature(getattr(AsyncLLM, name)).bind(self, *args, **kwargs)  # TypeError if vLLM changed it
        self.calls.append((name, args, kwargs))

    async def sleep(self, level: int, mode: str = "abort") -> None:
        self._record("sleep", level, mode=mode)
        self.sleeping_tags = {"weights", "kv_cache"}

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        if tags is None:
            self._record("wake_up")
        else:
            self._record("wake_up", tags=tags)
        self.sleeping_tags -= set(tags or self.sleeping_tags)
        return not self.sleeping_tags

    async def collective_rpc(self, method: str) -> list[Any]:
        self._record("collective_rpc", method)
        return [None]

    async def reset_prefix_cache(self) -> bool:
        self._record("reset_prefix_cache")
        return True

    async def is_sleeping(self) -> bool:
        self._record("is_sleeping")
        return bool(self.sleeping_tags)


@vllm_import_warnings
@pytest.mark.parametrize(("level", "wake_calls"), [
    (1, [("wake_up", (), {})]),
    (2, [("wake_up", (), {"tags": ["weights"]}), ("collective_rpc", ("reload_weights",), {}),
         ("wake_up", (), {"tags": ["kv_cache"]}), ("reset_prefix_cache", (), {})]),
])
def test_sleep_and_wake_follow_vllms_sequence(level: int, wake_calls: list[Any]) -> None:
    import asyncio

    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r models/requirements-cpu.txt)")
    from models.vllm.engine_vllm import sleep, wake

    engine = RecordingEngine()
    asyncio.run(sleep(engine, level))
    assert engine.calls == [("sleep", (level,), {"mode": "abort"})]  # after core/runtime/parking.py's drain
    engine.calls.clear()
    asyncio.run(wake(engine, level))
    assert engine.calls == [*wake_calls, ("is_sleeping", (), {})]


@vllm_import_warnings
def test_a_partial_wake_is_an_error() -> None:
    import asyncio

    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r models/requirements-cpu.txt)")
    from models.vllm.engine_vllm import wake

    engine = RecordingEngine()
    engine.sleeping_tags = {"weights", "kv_cache", "other"}  # a tag the level-2 sequence does not wake
    with pytest.raises(RuntimeError, match="still \\(partly\\) asleep after waking from level 2"):
        asyncio.run(wake(engine, 2))


def test_the_level_1_host_copy_is_estimated_from_the_weight_files(tiny_text: Path) -> None:
    from models.vllm.engine_vllm import Footprint, checkpoint_bytes

    weights = checkpoint_bytes(str(tiny_text))
    assert weights == sum(path.stat().st_size for path in tiny_text.glob("*.safetensors")) > 0
    use = Footprint(vram_bytes=5, weight_bytes=weights)
    assert (use.memory_use(None).vram_bytes, use.memory_use(None).host_bytes) == (5, 0)
    assert (use.memory_use(1).vram_bytes, use.memory_use(1).host_bytes) == (0, weights)
    assert (use.memory_use(2).vram_bytes, use.memory_use(2).host_bytes) == (0, 0)
    # Neither a folder nor a cached hub id: unknown (None), never 0, which would say parking costs
    # nothing (#19: the coordinator preferred that 0 over park.host_gb); /state then says null.
    assert checkpoint_bytes(str(tiny_text / "missing")) is None
    assert Footprint(vram_bytes=5, weight_bytes=None).memory_use(1).host_bytes is None


def test_pinned_host_copies_are_bounded_on_torch_2_13_and_counted_at_worst_before() -> None:
    # #20: level-1 sleep pins a copy of each weight allocation; torch rounds pinned blocks up to a power of
    # two and caches them after wake (vllm#16663). torch 2.13's options turn that off for large blocks.
    from models.vllm.engine_vllm import PINNED_EXACT_ABOVE_MB, Footprint, bound_pinned_host_memory

    env: dict[str, str] = {}
    assert bound_pinned_host_memory(env, "2.13.0+cu130") is True
    assert env["PYTORCH_ALLOC_CONF"] == (f"pinned_max_round_threshold_mb:{PINNED_EXACT_ABOVE_MB},"
                                         f"pinned_max_cached_size_mb:{PINNED_EXACT_ABOVE_MB}")
    own = {"PYTORCH_ALLOC_CONF": "expandable_segments:False,pinned_max_cached_size_mb:256"}
    assert bound_pinned_host_memory(own, "2.13.0") is True  # the operator's own value is kept
    assert own["PYTORCH_ALLOC_CONF"] == ("expandable_segments:False,pinned_max_cached_size_mb:256,"
                                         f"pinned_max_round_threshold_mb:{PINNED_EXACT_ABOVE_MB}")
    old: dict[str, str] = {}
    assert bound_pinned_host_memory(old, "2.9.1+cu128") is False and old == {}  # no such options: unknown keys
    weights = 10 * 1024**3
    bounded, unbounded = Footprint(weight_bytes=weights), Footprint(weight_bytes=weights, pinned_bounded=False)
    assert bounded.memory_use(1).host_bytes == weights
    assert bounded.memory_use(None, slept=True).host_bytes == 0  # freed on wake, not cached
    assert unbounded.memory_use(1).host_bytes == 2 * weights  # rounded up to a power of two: at worst 2x
    assert unbounded.memory_use(None, slept=True).host_bytes == 2 * weights  # and cached after wake
    assert unbounded.memory_use(None, slept=False).host_bytes == 0


@vllm_import_warnings
def test_vllm_serve_takes_the_sleep_mode_option() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r models/requirements-cpu.txt)")
    from models.vllm.engine_vllm import VllmSettings, serve_arguments

    assert serve_arguments(VllmSettings(model="/m", served_names=("m",), enable_sleep_mode=True)).enable_sleep_mode
    assert not serve_arguments(VllmSettings(model="/m", served_names=("m",))).enable_sleep_mode

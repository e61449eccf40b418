"""The text service's decisions that need no running service: vLLM options, the GPU share, aborts."""

from __future__ import annotations

import re

import pytest

from core.host.memory_share import GIB, WHOLE_GPU_UTILIZATION, ShareError
from models.vllm.engine_vllm import VllmSettings, choose_gpu_memory_utilization, vllm_argv
from models.vllm.server import TextService
from tests.markers import vllm_import_warnings

H100 = 80 * GIB
# Importing vLLM (and torch under it) warns about their own deprecations; not this project's concern.


def test_an_explicit_gpu_memory_utilization_wins() -> None:
    assert choose_gpu_memory_utilization(0.3, 4, H100) == (0.3, "--gpu-memory-utilization")
    assert choose_gpu_memory_utilization(0.3, None, None)[0] == 0.3


def test_on_cuda_the_share_sets_the_utilization() -> None:
    utilization, why = choose_gpu_memory_utilization(None, 20, H100)
    assert utilization == 0.25 and why == "vram_gb 20 GiB of 80.0 GiB"


def test_on_cuda_without_a_share_the_model_takes_most_of_the_gpu() -> None:
    assert choose_gpu_memory_utilization(None, None, H100)[0] == WHOLE_GPU_UTILIZATION


def test_on_cpu_vllm_keeps_its_default() -> None:
    assert choose_gpu_memory_utilization(None, 4, None)[0] is None


def test_a_share_larger_than_the_gpu_is_refused() -> None:
    with pytest.raises(ShareError, match="more than this GPU has"):
        choose_gpu_memory_utilization(None, 100, H100)


def test_settings_become_vllm_serve_options() -> None:
    settings = VllmSettings(model="/m", served_names=("qwen", "gpt-4o-mini"), max_model_len=16384,
                            gpu_memory_utilization=0.25, enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert vllm_argv(settings) == [
        "--model", "/m", "--served-model-name", "qwen", "gpt-4o-mini", "--dtype", "auto", "--tensor-parallel-size",
        "1", "--generation-config", "auto", "--max-model-len", "16384", "--gpu-memory-utilization", "0.25",
        "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    assert "--gpu-memory-utilization" not in vllm_argv(VllmSettings(model="/m", served_names=("m",)))
    pcie = VllmSettings(model="/m", served_names=("m",), tensor_parallel_size=2, disable_custom_all_reduce=True)
    assert vllm_argv(pcie)[-1] == "--disable-custom-all-reduce" and "2" in vllm_argv(pcie)


def test_peer_to_peer_off_turns_off_the_custom_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not TextService().argument_parser().parse_args([]).disable_custom_all_reduce
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")  # what the orchestrator sets for peer_to_peer: false
    assert TextService().argument_parser().parse_args([]).disable_custom_all_reduce


def test_served_names_default_to_the_model_folder_and_keep_their_order() -> None:
    service = TextService()
    service.options = service.argument_parser().parse_args(["--model", "/models/Qwen2.5-7B-Instruct"])
    service.model_path = service.options.model
    assert service.served_names == ["Qwen2.5-7B-Instruct"]
    assert service.options.gpu_memory_utilization is None  # chosen from the GPU share unless given
    service.options = service.argument_parser().parse_args(["--served-model-name", "qwen", "q", "gpt-4o-mini"])
    assert service.served_names == ["qwen", "q", "gpt-4o-mini"]


@vllm_import_warnings
def test_vllm_parses_the_options_like_vllm_serve() -> None:
    pytest.importorskip("vllm")
    from models.vllm.engine_vllm import serve_arguments

    args = serve_arguments(VllmSettings(model="/m", served_names=("qwen", "q"), enable_auto_tool_choice=True,
                                        tool_call_parser="hermes", generation_config="vllm",
                                        disable_custom_all_reduce=True))
    assert (args.model, args.served_model_name, args.generation_config) == ("/m", ["qwen", "q"], "vllm")
    assert args.disable_custom_all_reduce
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"
    with pytest.raises(KeyError, match="invalid tool call parser"):
        serve_arguments(VllmSettings(model="/m", served_names=("q",), enable_auto_tool_choice=True,
                                     tool_call_parser="no-such-parser"))


@vllm_import_warnings
def test_an_aborted_request_is_an_error_not_a_finished_answer() -> None:
    pytest.importorskip("vllm")
    from vllm.exceptions import GenerationError

    from models.vllm.vllm_openai import ABORTED, _serving_classes

    for serving in _serving_classes():
        hook = serving._raise_if_error  # called by vLLM's chat and completion generators on every output
        with pytest.raises(GenerationError, match=re.escape(ABORTED)):
            hook(object.__new__(serving), "abort", "request-1")
        with pytest.raises(GenerationError):
            hook(object.__new__(serving), "error", "request-1")  # vLLM's own check still applies
        for finished in ("stop", "length", None):
            hook(object.__new__(serving), finished, "request-1")


def test_a_transformers_generation_that_ends_early_is_an_error_not_a_stop() -> None:
    from types import SimpleNamespace

    from core.runtime.openai_text import GenerationParams
    from models.vllm.engine_transformers import TransformersEngine, _IncrementalDecoder

    class Chars:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(i) for i in ids)

    engine = object.__new__(TransformersEngine)
    engine.model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2]))
    params = GenerationParams(max_tokens=4, temperature=0, top_p=1, n=1, stop=(), seed=None,
                              presence_penalty=0, frequency_penalty=0)

    def finish(ids: list[int]) -> str:
        decoder = _IncrementalDecoder(Chars(), ())
        decoder.add(ids)
        return engine._finish(decoder, params)

    assert finish([97, 98, 2]) == "stop"  # the end-of-text token
    assert finish([97, 98, 99, 100]) == "length"
    with pytest.raises(RuntimeError, match="ended after 2 of 4 tokens"):
        finish([97, 98])

"""A transformers text engine behind the hand-written OpenAI layer: for machines without vLLM.

One generation at a time (transformers' generate is not made for concurrent calls on one
model): each request is one job on the engine's ``core.runtime.worker.Worker``, whose thread runs
its choices one after another and streams their tokens to the event loop. A request that
is cancelled (client gone) stops its generation at the next token, and the next request
starts only once that generation has returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from core.host.memory_share import release_cached_memory
from core.runtime.host_copy import HostCopy
from core.runtime.openai_text import GenerationParams, TextChunk, TokenizerPrompts, stop_cut
from core.runtime.parking import MemoryUse
from core.runtime.torch_helpers import torch_dtype
from core.runtime.worker import JobContext, Worker
from models.vllm.grammar import Grammars

log = logging.getLogger(__name__)


class TransformersEngine(TokenizerPrompts):
    def __init__(self, model_path: str, device: str, dtype: str, max_model_len: int | None) -> None:
        from transformers import AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = _load_model(model_path, device, dtype)
        configured = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_model_len = min(max_model_len or configured, configured)
        self.worker = Worker("transformers")
        self.grammars = Grammars(self.tokenizer, int(self.model.config.vocab_size), sorted(self._eos_ids()))
        # Parking; level 2 reloads the weights as they were loaded here.
        self.weights = HostCopy([self.model], device, loader=lambda: [_load_model(model_path, device, dtype)])

    # -- parking (core/runtime/parking.py), as jobs on the worker: never beside a generation -------------------

    async def offload(self, level: int) -> None:
        """Give the weights' device memory back: kept in host memory (level 1) or dropped (level 2)."""
        await self.weights.park_on(self.worker, level)

    async def restore(self) -> None:
        await self.weights.restore_on(self.worker)

    def memory_use(self) -> MemoryUse:
        return self.weights.memory_use()

    # -- generation ----------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: GenerationParams, request_id: str
                       ) -> AsyncIterator[TextChunk]:
        """Each choice's text as it is decoded, then its final chunk (with the finish reason).

        The thread sends ``(index, token ids)`` and ``(index, None)`` once choice ``index`` has
        ended; decoding stays on the loop, the only place that uses the tokenizer.
        """
        # A stop sequence ends one choice, not the request: its own flag, apart from the job's.
        stops = [threading.Event() for _ in range(params.n)]
        decoders = [_IncrementalDecoder(self.tokenizer, params.stop) for _ in range(params.n)]
        pending = [0] * params.n  # tokens whose text is held back (partial character, possible stop)
        events = self.worker.stream(self._generate_choices, prompt_ids, params, stops, label=request_id)
        try:
            async for index, ids in events:
                decoder = decoders[index]
                if ids is None:
                    yield TextChunk(index, decoder.flush(), pending[index], self._finish(decoder, params))
                    pending[index] = 0
                    continue
                if decoder.stopped:
                    continue  # generated before the thread saw the stop; never shown, never counted
                pending[index] += len(ids)
                text = decoder.add(ids)
                if decoder.stopped:
                    stops[index].set()
                if text:
                    yield TextChunk(index, text, pending[index])
                    pending[index] = 0
        finally:
            await events.aclose()  # a client that went away stops the thread

    def _finish(self, decoder: _IncrementalDecoder, params: GenerationParams) -> str:
        if decoder.stopped or (decoder.ids and decoder.ids[-1] in self._eos_ids()):
            return "stop"
        if len(decoder.ids) >= params.max_tokens:
            return "length"
        # Neither the end of the text nor the limit: the answer was cut off, which "stop" would hide.
        raise RuntimeError(f"the generation ended after {len(decoder.ids)} of {params.max_tokens} tokens "
                           "without an end-of-text token")

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    # -- in the worker thread --------------------------------------------------------------

    def _generate_choices(self, ctx: JobContext, prompt_ids: list[int], params: GenerationParams,
                          stops: list[threading.Event]) -> None:
        for index, stop in enumerate(stops):
            seed = None if params.seed is None else params.seed + index
            self._generate_one(ctx, prompt_ids, params, seed, _ChoiceStreamer(ctx, index), stop)
            ctx.check()  # cancelled: the choice was cut short, and no later one starts
            ctx.emit((index, None))

    def _generate_one(self, ctx: JobContext, prompt_ids: list[int], params: GenerationParams, seed: int | None,
                      streamer: _ChoiceStreamer, stop: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopWhenAsked(StoppingCriteria):  # type: ignore[misc]  # transformers is untyped here
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), ctx.cancelled or stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        if seed is not None:
            torch.manual_seed(seed)
        sample = params.temperature > 0
        # JSON or a tool call: a grammar masks what cannot continue it (models/vllm/grammar.py)
        held = [self.grammars.processor(params.structure)] if params.structure is not None else None
        self.model.generate(
            torch.tensor([prompt_ids], device=self.device), max_new_tokens=params.max_tokens,
            do_sample=sample, temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None, streamer=streamer,
            min_new_tokens=params.max_tokens if params.ignore_eos else None,
            stopping_criteria=StoppingCriteriaList([StopWhenAsked()]), logits_processor=held,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )

    async def close(self) -> None:
        await self.worker.close()  # a generation still running stops at its next token first
        self.weights.close()
        del self.model, self.weights
        release_cached_memory()


def _load_model(model_path: str, device: str, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype, device)).to(device).eval()


class _ChoiceStreamer:
    """transformers streamer interface: receives the prompt first, then each new token."""

    def __init__(self, ctx: JobContext, index: int) -> None:
        self.ctx, self.index, self.prompt_seen = ctx, index, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ctx.emit((self.index, [int(t) for t in value.reshape(-1).tolist()]))

    def end(self) -> None:
        pass


class _IncrementalDecoder:
    """Turns token ids into text deltas, holding back text that may begin a stop sequence."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._holdback = max((len(s) for s in stops), default=1) - 1

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        cut = stop_cut(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._take(text, cut)
        return self._take(text, len(text) - self._holdback)

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = text[self.sent:upto], upto
        return delta

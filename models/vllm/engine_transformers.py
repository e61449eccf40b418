"""A transformers text engine behind the hand-written OpenAI layer: for machines without vLLM.

One generation at a time (transformers' generate is not made for concurrent calls on one
model); tokens stream from the generating thread into the event loop through a queue.
A request that is cancelled (client gone) stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from models.vllm.openai_text import GenerationParams, TextChunk, TokenizerPrompts, stop_cut

log = logging.getLogger(__name__)
_END = object()


class TransformersEngine(TokenizerPrompts):
    def __init__(self, model_path: str, device: str, dtype: str, max_model_len: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else (
            torch.bfloat16 if device == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
        configured = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_model_len = min(max_model_len or configured, configured)
        self._lock = asyncio.Lock()

    # -- generation ----------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: GenerationParams, request_id: str
                       ) -> AsyncIterator[TextChunk]:
        async with self._lock:
            for index in range(params.n):
                seed = None if params.seed is None else params.seed + index
                async for chunk in self._one(prompt_ids, params, index, seed):
                    yield chunk

    async def _one(self, prompt_ids: list[int], params: GenerationParams, index: int, seed: int | None
                   ) -> AsyncIterator[TextChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        worker = loop.run_in_executor(None, self._run, prompt_ids, params, seed, queue, loop, cancel)
        decoder = _IncrementalDecoder(self.tokenizer, params.stop)
        pending = 0  # tokens whose text is held back (partial character or possible stop sequence)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                pending += len(item)
                text = decoder.add(item)
                if decoder.stopped:
                    cancel.set()
                if text:
                    yield TextChunk(index, text, pending)
                    pending = 0
                if decoder.stopped:
                    break
            await worker
            yield TextChunk(index, decoder.flush(), pending, self._finish(decoder, params))
        finally:
            cancel.set()  # a client that went away stops the thread at its next token

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

    def _run(self, prompt_ids: list[int], params: GenerationParams, seed: int | None,
             queue: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop, cancel: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        try:
            if seed is not None:
                torch.manual_seed(seed)
            sample = params.temperature > 0
            self.model.generate(
                torch.tensor([prompt_ids], device=self.device), max_new_tokens=params.max_tokens,
                do_sample=sample, temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None, streamer=_QueueStreamer(queue, loop),
                min_new_tokens=params.max_tokens if params.ignore_eos else None,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        except BaseException as exc:
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    async def close(self) -> None:
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _QueueStreamer:
    """transformers streamer interface: receives the prompt first, then each new token."""

    def __init__(self, queue: asyncio.Queue[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.queue, self.loop, self.prompt_seen = queue, loop, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, [int(t) for t in value.reshape(-1).tolist()])

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

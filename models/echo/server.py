"""echo: a dependency-free text service that answers with the prompt it was sent.

Not a language model: a diagnostic service for checking a pod end to end (routing,
streaming, swapping) without loading weights. It is an engine of the project's OpenAI
layer (core/runtime/openai_text.py, core/runtime/text_routes.py), the one the transformers engine uses,
with whitespace-separated words as "tokens": its answers are the production layer's.

    python models/echo/server.py --port 8001 [--token-delay 0.05] [--served-name echo]
        [--load-seconds S --park-seconds S --restore-seconds S]

It parks and restores too (holding nothing, taking the time it is told), so warm swaps can be
checked end to end without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from itertools import accumulate
from typing import Any

from fastapi import FastAPI

from core.base_service import BaseService
from core.runtime.openai_text import EngineLimits, GenerationParams, TextChunk, stop_cut
from core.runtime.parking import ParkLevel
from core.runtime.text_routes import mount_text_routes

# Echo's "chat template": a token opening each message. It holds whitespace, so no word of a
# prompt can be mistaken for it.
MESSAGE_START = "<| message |>"
ECHO_LIMITS = EngineLimits(engine="echo", hint="echo only repeats the prompt it was sent (the last message).",
                           ignore_eos=False)  # nothing comes after the prompt's last word


class EchoEngine:
    """Words in, the same words out: the last message of a chat, or the whole completion prompt."""

    def __init__(self, token_delay: float, max_model_len: int) -> None:
        self.token_delay = token_delay
        self.max_model_len = max_model_len

    def chat_prompt_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                        ) -> list[str]:
        return [token for message in messages for token in (MESSAGE_START, *str(message["content"]).split())]

    def prompt_ids(self, prompt: str) -> list[str]:
        return prompt.split()

    def reply_words(self, prompt_ids: list[str]) -> list[str]:
        starts = [i for i, token in enumerate(prompt_ids) if token == MESSAGE_START]
        return prompt_ids[starts[-1] + 1:] if starts else prompt_ids

    async def generate(self, prompt_ids: list[str], params: GenerationParams, request_id: str
                       ) -> AsyncIterator[TextChunk]:
        words = self.reply_words(prompt_ids)
        for index in range(params.n):
            for position, chunk in enumerate(reply_chunks(index, words, params)):
                if position and self.token_delay:
                    await asyncio.sleep(self.token_delay)  # between tokens, as a model generates them
                yield chunk

    async def close(self) -> None:
        pass


def reply_chunks(index: int, words: list[str], params: GenerationParams) -> list[TextChunk]:
    """One chunk per word of the reply, as far as ``max_tokens`` and the first stop sequence allow;
    the last chunk carries the finish reason, as vLLM's do."""
    pieces = [word if i == 0 else " " + word for i, word in enumerate(words[:params.max_tokens])]
    starts = [0, *accumulate(len(piece) for piece in pieces)]
    text = "".join(pieces)
    cut = stop_cut(text, params.stop)
    if cut is None:
        finish, end = ("length" if len(words) > params.max_tokens else "stop"), len(text)
    else:  # generation ends at the word where the stop sequence begins; the text ends before it
        finish, end = "stop", cut
        pieces = [piece for piece, start in zip(pieces, starts, strict=False) if start <= cut]
    chunks = [TextChunk(index, piece[:max(0, end - start)], 1) for piece, start in zip(pieces, starts, strict=False)]
    last = chunks.pop() if chunks else TextChunk(index, "", 0)
    return [*chunks, TextChunk(index, last.text, last.tokens, finish)]


class EchoService(BaseService):
    name = "echo"
    default_port = 8001

    def __init__(self) -> None:
        super().__init__()
        self.engine: EchoEngine | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
        parser.add_argument("--served-name", default="echo", help="model name reported in responses")
        parser.add_argument("--strict-model-name", action="store_true",
                            help="answer 404 to a `model` other than --served-name, as vLLM's server does")
        parser.add_argument("--max-model-len", type=int, default=1 << 20,
                            help="context length in words (prompt plus answer)")
        parser.add_argument("--load-seconds", type=float, default=0.0,
                            help="seconds loading takes (models a real engine's, for checking swaps)")
        parser.add_argument("--park-seconds", type=float, default=0.0,
                            help="seconds a park takes (models a real engine's, for checking warm swaps)")
        parser.add_argument("--restore-seconds", type=float, default=0.0, help="seconds a restore takes")

    @property
    def served_name(self) -> str:
        return str(self.options.served_name)

    def create_engine(self) -> EchoEngine:
        return EchoEngine(self.options.token_delay, self.options.max_model_len)

    async def load(self) -> None:
        await asyncio.sleep(self.options.load_seconds)
        self.engine = self.create_engine()

    async def offload(self, level: ParkLevel) -> None:
        """Echo holds no weights: parking only takes the time it is told to (--park-seconds)."""
        self.engine = None
        await asyncio.sleep(self.options.park_seconds)

    async def restore(self) -> None:
        await asyncio.sleep(self.options.restore_seconds)
        self.engine = self.create_engine()

    def add_routes(self, app: FastAPI) -> None:
        mount_text_routes(app, lambda: self.engine, [self.served_name], ECHO_LIMITS,
                          strict_model_name=self.options.strict_model_name)


__all__ = ["EchoEngine", "EchoService", "reply_chunks"]

if __name__ == "__main__":
    EchoService().run()

"""The text service's engine-neutral pieces: request checks and incremental decoding (no torch)."""

from __future__ import annotations

import pytest

from core.common.errors import ServiceError
from core.runtime.openai_text import ChatRequest, CompletionRequest, generation_params, stop_cut
from models.vllm.engine_transformers import _IncrementalDecoder


class CharTokenizer:
    """Token id = a character's code point; decode joins them."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_decoder_streams_text_without_stops() -> None:
    decoder = _IncrementalDecoder(CharTokenizer(), ())
    assert [decoder.add(ids(c)) for c in "hello"] == list("hello")
    assert decoder.flush() == "" and not decoder.stopped


def test_decoder_holds_back_a_possible_stop_prefix_then_cuts_at_the_stop() -> None:
    decoder = _IncrementalDecoder(CharTokenizer(), ("END",))
    out = [decoder.add(ids(c)) for c in "abEN"]
    assert "".join(out) == "ab"  # "EN" may be the start of "END": held back
    assert decoder.add(ids("D")) == "" and decoder.stopped
    assert decoder.flush() == ""


def test_decoder_releases_held_text_that_was_not_a_stop() -> None:
    decoder = _IncrementalDecoder(CharTokenizer(), ("END",))
    text = "".join(decoder.add(ids(c)) for c in "xENy")
    assert text + decoder.flush() == "xENy" and not decoder.stopped


def test_decoder_waits_for_a_complete_character() -> None:
    class Partial(CharTokenizer):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return super().decode(ids).replace("#", "\ufffd")  # '#' plays an incomplete byte sequence

    decoder = _IncrementalDecoder(Partial(), ())
    assert decoder.add(ids("a#")) == ""  # the text ends in a partial character: wait for more
    assert decoder.add(ids("b")) == "a\ufffdb"  # more came; what stays invalid is released as is
    assert decoder.flush() == ""


def test_stop_cut_finds_the_earliest_stop() -> None:
    assert stop_cut("one two three", ["three", "two"]) == 4
    assert stop_cut("nothing here", ["zzz"]) is None


def chat(**fields: object) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_max_tokens_defaults_to_the_room_left_in_the_context() -> None:
    assert generation_params(chat(), prompt_tokens=100, max_model_len=512).max_tokens == 412


def test_max_completion_tokens_wins_and_stop_becomes_a_tuple() -> None:
    params = generation_params(chat(max_completion_tokens=7, max_tokens=9, stop="x"), 10, 512)
    assert params.max_tokens == 7 and params.stop == ("x",)


@pytest.mark.parametrize(("fields", "prompt_tokens", "param", "code"), [
    ({"max_tokens": 500}, 100, "max_tokens", "context_length_exceeded"),
    ({}, 512, "messages", "context_length_exceeded"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 10, "stop", "invalid_value"),
    ({"stop": [""]}, 10, "stop", "invalid_value"),
])
def test_generation_params_refuses_with_the_param(fields: dict[str, object], prompt_tokens: int, param: str,
                                                  code: str) -> None:
    with pytest.raises(ServiceError) as info:
        generation_params(chat(**fields), prompt_tokens, 512)
    assert info.value.status == 400 and info.value.param == param and info.value.code == code


def test_completion_request_accepts_unknown_fields() -> None:
    request = CompletionRequest.model_validate({"prompt": "x", "user": "u", "logprobs": None})
    assert request.prompt == "x"

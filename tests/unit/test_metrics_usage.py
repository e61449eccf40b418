"""Token counts read from an answer's last ``usage`` object (model_orchestrator/metrics.py), in every shape served."""

from __future__ import annotations

import pytest

from model_orchestrator.metrics import usage_tokens


@pytest.mark.parametrize(("tail", "tokens"), [
    (b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}\n\n'
     b"data: [DONE]\n\n", (3, 4)),  # chat and completions, streamed
    (b'{"output": [], "usage": {"input_tokens": 75, "input_tokens_details": {"cached_tokens": 0, "per_turn": []}, '
     b'"output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}}}', (75, 5)),  # the Responses API
    (b'{"type": "message", "usage": {"input_tokens": 74, "output_tokens": 6}}', (74, 6)),  # Anthropic's Messages
    (b'{"usage": {"prompt_tokens": 1}} {"usage": {"prompt_tokens": 9, "completion_tokens": 2}}', (9, 2)),  # the last
    (b'{"data": []}', None),
    (b'{"usage": {"prompt_tokens": 5}} {"usage": {"prompt_tokens": 2', (5, 0)),  # the last, cut off: the one before
    (b'{"usage": {"prompt_tokens": 1, "d": {}}, "completion_tokens": 99}', (1, 0)),  # only what is inside it
    (b'data: {"usage": null}\n\ndata: {"usage": null}', None),
])
def test_usage_tokens(tail: bytes, tokens: tuple[int, int] | None) -> None:
    assert usage_tokens(tail) == tokens

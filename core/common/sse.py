"""Server-sent events as OpenAI streams them: ``data: <json>`` events, then ``data: [DONE]``.

The one framing helper for every producer of an event stream: the text layer's
streams, and the proxy's error event when a model breaks off mid-stream.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One event. UTF-8 as is (no \\u escapes): streamed text stays as small as it reads."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

"""model_orchestrator.paths: the one form of a request path that is decided on and sent on.

Tables of what ``canonical_path`` accepts and refuses (the spellings that climbed out of
``/v1`` before the fix among them), and a property over generated paths: whatever it
accepts is a path no later layer (a server decoding it, yarl resolving dot-segments) can
read as another one.
"""

from __future__ import annotations

from urllib.parse import unquote

import pytest
import yarl
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from core.common.errors import ServiceError
from model_orchestrator.paths import canonical_path, upstream_query, upstream_target

# The spellings of "../" that reached the service's /offload through POST /v1/<spelling>offload
# before the fix, as raw bytes on the request line.
ESCAPES = [b"%2e%2e/", b"..%2f", b"%2E%2E%2F", b"chat/../../", b"%252e%252e/", b".%2e/", b"%2e./"]


def refusal(raw: bytes) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        canonical_path(raw)
    return info.value


# --- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "canonical"), [
    (b"/v1/chat/completions", "/v1/chat/completions"),
    (b"/v1/models/Qwen/Qwen2.5-7B", "/v1/models/Qwen/Qwen2.5-7B"),
    (b"/v1/chat/completions/", "/v1/chat/completions/"),  # a trailing "/" is no empty segment
    (b"/", "/"),
    (b"/v1/my%20model", "/v1/my model"),
    (b"/v1/caf%C3%A9", "/v1/caf\u00e9"),  # UTF-8, decoded once
    (b"/v1/caf\xc3\xa9", "/v1/caf\u00e9"),  # the same bytes sent unescaped
    (b"/v1/.well-known", "/v1/.well-known"),  # a segment that starts with a dot is not a dot-segment
    (b"/v1/.../a..b/.x.", "/v1/.../a..b/.x."),
    (b"/v1/chat/completions?stream=1&x=%2e%2e/..", "/v1/chat/completions"),  # the query is not the path
    (b"/%75pstream/a/health", "/upstream/a/health"),  # decoded once: an admin route, checked as one
    (b"/v1/%7e%41", "/v1/~A"),
    (b"/v1/a;b=c:d@e", "/v1/a;b=c:d@e"),
])
def test_accepted_paths_are_decoded_once(raw: bytes, canonical: str) -> None:
    assert canonical_path(raw) == canonical


# --- refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    *[b"/v1/" + escape + b"offload?level=1" for escape in ESCAPES],
    b"/v1/..", b"/v1/.", b"/v1/./chat/completions", b"/v1/chat/completions/..", b"/v1/chat/%2e",
    b"/upstream/a/offload%3Flevel=1",  # '?' once decoded: would be sent as /offload?level=1
    b"/v1/chat%3Fx", b"/v1/chat%23x", b"/v1/chat%5C..%5Coffload", b"/v1/chat\\..\\offload",
    b"/v1/chat%2Fcompletions", b"/v1/chat%2fcompletions", b"/v1/a%252Fb",
    b"/v1/100%25", b"/v1/%zz", b"/v1/%",  # a '%' left once decoded: double encoding or a stray escape
    b"/v1//chat/completions", b"//v1/chat/completions", b"/v1/chat//",
    b"/v1/a%00b", b"/v1/a%0Ab", b"/v1/a%7Fb", b"/v1/a\x01b",
    b"/v1/%ff", b"/v1/%C3", b"/v1/\xff",  # not UTF-8
    b"*", b"", b"?x=1", b"v1/chat/completions", b"http://h/v1/chat/completions", b"%2Fv1/chat/completions",
    # uvicorn's h11 parser (not httptools) leaves a literal '#' in raw_path: refused like '%23'.
    b"/upstream/a/offload#x",
])
def test_refused_paths_are_a_400_invalid_path(raw: bytes) -> None:
    error = refusal(raw)
    assert (error.status, error.code) == (400, "invalid_path"), raw
    assert "is not accepted" in error.message


def test_the_refusal_names_the_path_safely() -> None:
    message = refusal(b"/v1/\xff\x1b[2J" + b"x" * 500).message
    assert message.isprintable() and "x" * 190 in message  # escaped: no terminal control reaches a log
    assert len(message) < 400  # the path is cut short in the message


# --- sent on -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"/v1/chat/completions", b"/v1/models/Qwen/Qwen2.5-7B", b"/v1/a%20b/", b"/v1/caf%C3%A9", b"/v1/.well-known",
    b"/v1/a;b=c", b"/v1/a+b", b"/v1/~x", b"/v1/...", b"/v1/%22%3C%3E%5E%60%7B%7C%7D", b"/v1/[x]",
])
def test_the_upstream_target_decodes_back_to_exactly_the_canonical_path(raw: bytes) -> None:
    path = canonical_path(raw)
    target = upstream_target(path)
    assert unquote(target, errors="strict") == path
    assert target.isascii() and " " not in target and "?" not in target and "#" not in target
    assert yarl.URL("http://h" + target, encoded=True).raw_path == target  # sent as it is


def test_the_query_is_sent_with_its_own_escapes() -> None:
    assert upstream_query(b"level=1&x=%2e%2e%2F") == "level=1&x=%2e%2e%2F"
    assert upstream_query(b"a=b c#d\xff") == "a=b%20c%23d%FF"  # nothing that could end the request line or URL


# --- the property ------------------------------------------------------------------------------

# Weighted by repetition: plain words, "/" and unescaped characters mostly, so that about a third of
# the paths are accepted (near misses among them) and the property has something to check.
WORDS = ["a", "v1", "offload", "upstream", "m", "...", ".a", "a.", "..a", "~", "a b", "\u00e9"]
SEGMENTS = st.sampled_from(WORDS * 4 + [".", "..", ""] + ["?", "#", "%"])
SEPARATORS = st.sampled_from(["/"] * 24 + ["%2f", "%2F", "\\", "%5c", "%5C"])
TIMES_ESCAPED = st.sampled_from([0] * 24 + [1] * 8 + [2])


def escaped(char: str, upper: bool) -> str:
    return "".join(f"%{byte:02X}" if upper else f"%{byte:02x}" for byte in char.encode())


@st.composite
def spelled(draw: st.DrawFn, char: str) -> str:
    """``char`` as it is, percent-encoded once, or twice (``%252e``), in upper or lower case hex."""
    times = draw(TIMES_ESCAPED)
    upper = draw(st.booleans())
    if times == 0 and char not in "?#%":  # a literal '?' starts the query, a literal '%' is an escape
        return char
    once = escaped(char, upper)
    return once if times == 1 else escaped("%", draw(st.booleans())) + once[1:]


@st.composite
def raw_paths(draw: st.DrawFn) -> bytes:
    """Segments (words, dots, empty ones) each after a separator, and maybe a trailing one."""
    pieces = []
    for _ in range(draw(st.integers(1, 5))):
        pieces.append(draw(SEPARATORS))
        pieces.extend(draw(spelled(char)) for char in draw(SEGMENTS))
    if draw(st.booleans()):
        pieces.append(draw(SEPARATORS))
    return "".join(pieces).encode()


def resolved_as_yarl_does(url: str, encoded: bool) -> str:
    return yarl.URL("http://h" + url, encoded=encoded).path


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(raw_paths())
@example(b"/v1/%2e%2e/offload").via("the report's first spelling")
@example(b"/v1/%252e%252e/offload").via("double encoding")
@example(b"/v1/.%2e%5coffload").via("a backslash once decoded")
def test_an_accepted_path_is_one_no_later_layer_reads_differently(raw: bytes) -> None:
    try:
        path = canonical_path(raw)
    except ServiceError as exc:
        assert (exc.status, exc.code) == (400, "invalid_path")
        event("refused")
        return
    event("accepted")
    segments = path.split("/")[1:]
    assert path.startswith("/")
    assert not {".", ".."} & set(segments), path
    assert "" not in segments[:-1], path
    assert not any(char in path for char in "\\?#%"), path
    target = upstream_target(path)
    assert unquote(target, errors="strict") == path  # what the service decodes is what was decided on
    assert resolved_as_yarl_does(target, encoded=True) == path
    assert resolved_as_yarl_does(path, encoded=False) == path  # even a client that normalises keeps it
    assert canonical_path(target.encode()) == path  # and checked once more, the same path

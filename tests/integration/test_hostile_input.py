"""Hostile input: fuzzed requests against a real orchestrator process on a real socket (issue #9).

Hypothesis generates methods, paths, headers and bodies (junk bytes, random JSON, wrong
types, deep nesting, huge strings, invalid UTF-8), and malformed HTTP framing on raw
sockets. Whatever arrives, the orchestrator must answer like a server users can rely on:

* never a 500; a 5xx only for an upstream failure (502/503/504) in the OpenAI envelope;
* every 4xx/5xx body an OpenAI envelope ``{"error": {"message", "type", "code"}}``, also
  for paths no route knows (uvicorn's own plain 400 for bytes its parser refuses excepted);
* keys reach exactly their routes: no key reaches nothing but /health, a client key no
  admin route, and a valid key is never answered 401;
* afterwards the process still serves, and stopping it leaves no service behind.

One orchestrator serves the module. Its upstreams, the fake service (echo underneath), a copy
that SIGKILLs itself on every POST and one that resets every connection, make upstream failures
reachable. Examples are derandomized: CI sends the same ~370 requests every run (~15 s).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import (
    Orchestrator,
    fake_model,
    free_port,
    processes_with,
    start_orchestrator,
    stop_orchestrator,
    write_config,
)

pytestmark = pytest.mark.integration

CLIENT_KEY, ADMIN_KEY = "fuzz-client-key", "fuzz-admin-key"
UPSTREAM_FAILURES = frozenset({502, 503, 504})
TIMEOUT = httpx.Timeout(20.0, connect=5.0)  # a model start takes ~1 s: 20 s means the request hung
BODY_CAP = 1 << 20  # successful bodies are read this far; error bodies are small and read whole
KEYED = {"Authorization": f"Bearer {CLIENT_KEY}".encode()}
PARSER_400 = b"Invalid HTTP request received."  # uvicorn's answer to bytes its parser refuses
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

# A model service that reads a request and resets the connection (RST) instead of answering,
# as a crashing server or a middlebox does. /health answers, so it counts as ready.
RESETTING_SERVICE = """
import contextlib, socket, struct, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])))
while True:
    conn, _ = server.accept()
    with conn, contextlib.suppress(OSError):
        conn.settimeout(5)
        if conn.recv(65536).startswith(b"GET /health "):
            conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 2\\r\\n\\r\\n{}")
        else:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
"""


@pytest.fixture(scope="module")
def orch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """One orchestrator for the module, keyed as a deployment is; leak-checked when it stops."""
    directory = tmp_path_factory.mktemp("hostile")
    models = {  # all fit the budget together: no swaps, so examples do not pay for restarts
        "chat": fake_model("chat", vram_gb=1, aliases=["gpt-4o"]),
        "emb": fake_model("emb", type="embedding", vram_gb=1),
        "crashy": fake_model("crashy", "--crash-after", "0", vram_gb=1, max_restarts=4),
        "resets": {"type": "text", "command": [sys.executable, "-c", RESETTING_SERVICE, "--port", "{port}"],
                   "port": free_port(), "startup_time": 20, "stop_timeout": 5, "vram_gb": 1},
    }
    config = write_config(directory, models, gpu_memory_gb=100, max_wait=10, restart_backoff_max=0.5,
                          api_key_env="AIO_API_KEYS", admin_key_env="AIO_ADMIN_KEYS")
    started = start_orchestrator(config, directory / "orchestrator.log",
                                 {"AIO_API_KEYS": CLIENT_KEY, "AIO_ADMIN_KEYS": ADMIN_KEY})
    try:
        yield started
    finally:
        stop_orchestrator(started)
        leaked = [p for m in models.values() for p in processes_with(f"--port {m['port']}")]
        for proc in leaked:
            proc.kill()
        assert not leaked, f"service processes left behind: {leaked}"


@pytest.fixture(scope="module")
def http(orch: Orchestrator) -> Iterator[httpx.Client]:
    # A fresh connection per example: each answer is judged alone. On a reused one, an earlier
    # example could leave the server closing it (its unread body past the header bound, or the
    # idle deadline while hypothesis builds a large example under load), and the next example
    # would be blamed for the reset.
    with httpx.Client(base_url=orch.url, timeout=TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


# -- what was sent, what came back, and the properties --------------------------------------


@dataclass
class Sent:
    method: str
    target: str  # the request target exactly as on the request line
    headers: dict[str, bytes]
    body: bytes

    @property
    def role(self) -> str | None:
        """admin / client / none; None for Authorization variants whose meaning is arguable."""
        auth = self.headers.get("Authorization")
        if auth is None or auth in (b"Basic Zm9vOmJhcg==", b"Bearer", b"Bearer wrong-key", b"Bearer " + b"k" * 5000):
            return "none"
        return {f"Bearer {ADMIN_KEY}".encode(): "admin", f"Bearer {CLIENT_KEY}".encode(): "client"}.get(auth)

    @property
    def path(self) -> str:
        """The path the server routes on: percent-decoded, as uvicorn puts it in the ASGI scope."""
        raw = self.target if self.target.startswith("/") else urlsplit(self.target).path
        return unquote(raw.split("?", 1)[0])

    def describe(self) -> str:
        body = self.body if len(self.body) <= 300 else self.body[:300] + b"...(%d bytes)" % len(self.body)
        return f"request: {self.method} {self.target[:300]!r}\n  headers: {self.headers!r}\n  body: {body!r}"


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    complete: bool = True  # False when reading stopped at BODY_CAP

    def describe(self) -> str:
        return f"\nresponse: {self.status} {self.content_type!r} {self.body[:500]!r}"


def envelope_problem(content_type: str, body: bytes) -> str | None:
    """What keeps ``body`` from being an OpenAI error envelope, or None."""
    if not content_type.startswith("application/json"):
        return f"content-type {content_type!r}"
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return "no JSON object with an 'error' member"
    if not isinstance(error, dict) or not all(isinstance(error.get(k), str) for k in ("message", "type")) \
            or "code" not in error:
        return "'error' lacks message/type/code"
    return None


def check_status(answer: Answer, where: str, body_expected: bool = True, parser_may_refuse: bool = False) -> None:
    assert answer.status != 500, f"500 Internal Server Error\n{where}"
    assert answer.status < 500 or answer.status in UPSTREAM_FAILURES, f"5xx other than 502/503/504\n{where}"
    refused_by_parser = parser_may_refuse and answer.status == 400 and answer.body == PARSER_400
    if answer.status >= 400 and body_expected and not refused_by_parser:
        problem = envelope_problem(answer.content_type, answer.body)
        assert problem is None, f"error body is not an OpenAI envelope ({problem})\n{where}"


def public(path: str) -> bool:
    """/health, and the dashboard's static files (no data: the page calls the admin routes with a key)."""
    return path in ("/health", "/", "/ui") or path.startswith("/ui/")


def check(sent: Sent, answer: Answer) -> None:
    where = f"{sent.describe()}{answer.describe()}"
    check_status(answer, where, body_expected=sent.method != "HEAD")  # a HEAD answer has no body
    admin_route = sent.path.startswith(("/admin/", "/logs/", "/upstream/")) or sent.path in ("/status", "/metrics")
    if sent.role == "none":
        assert answer.status >= 400 or public(sent.path), f"reached a route without a key\n{where}"
    elif sent.role == "client" and admin_route:
        assert not 200 <= answer.status < 300, f"a client key reached an admin route\n{where}"
    if sent.role == "admin" or (sent.role == "client" and sent.path.startswith("/v1/")):
        assert answer.status != 401, f"a valid key was refused\n{where}"
    if answer.status == 200 and answer.content_type.startswith("text/event-stream") and answer.complete:
        last = [line for line in answer.body.decode(errors="replace").splitlines() if line.startswith("data: ")][-1:]
        assert last == ["data: [DONE]"] or (last and '"error"' in last[0]), f"stream ended mid-way\n{where}"


def exchange(http: httpx.Client, sent: Sent) -> Answer:
    """Send ``sent`` with its exact request target; read the answer (successful bodies up to BODY_CAP)."""
    request = http.build_request(sent.method, "/", headers=[(k.encode(), v) for k, v in sent.headers.items()],
                                 content=sent.body, extensions={"target": sent.target.encode("ascii")})
    try:
        response = http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise AssertionError(f"no answer: {type(exc).__name__}: {exc}\n{sent.describe()}") from None
    body, complete = bytearray(), True
    try:
        for chunk in response.iter_raw():
            body += chunk
            if len(body) >= BODY_CAP and response.status_code < 400:
                complete = False
                break
    except httpx.HTTPError as exc:
        raise AssertionError(f"answer broke off: {type(exc).__name__}: {exc}\n{sent.describe()}") from None
    finally:
        response.close()
    return Answer(response.status_code, response.headers.get("content-type", ""), bytes(body), complete)


# -- requests through httpx ----------------------------------------------------------------

_PATH_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "?#")  # h11 sends visible ASCII only
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Framing headers are fuzzed on raw sockets below: through httpx they would desync the client.
_RESERVED = {"authorization", "content-length", "transfer-encoding", "host", "connection", "upgrade", "expect"}

MODEL_NAMES = ["chat", "emb", "crashy", "resets", "gpt-4o", "nope", "", "chat/extra", "..", "%2e%2e", "%00", "%FF%FE"]
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/images/generations",
          "/v1/audio/speech", "/v1/models", "/health", "/status", "/metrics", "/docs", "/openapi.json",
          "/ui/", "/ui/app.js", "/ui/nope"]
TEMPLATES = ["/v1/models/{}", "/logs/{}", "/admin/models/{}/load", "/admin/models/{}/unload",
             "/admin/models/{}/reset", "/admin/models/{}/park", "/upstream/{}/health", "/upstream/{}/offload",
             "/upstream/{}/v1/chat/completions", "/upstream/{}/{}"]
QUERIES = ["", "", "", "?lines=abc", "?lines=-1", "?lines=100000000", "?lines=5&lines=6", "?follow=maybe",
           "?%zz=%zz", "?" + "a=b&" * 2000]  # never ?follow=true: a followed log never ends

junk = st.text(_PATH_CHARS, max_size=40)
percent_junk = st.binary(max_size=24).map(lambda raw: "".join(f"%{byte:02X}" for byte in raw))
names = st.sampled_from(MODEL_NAMES) | junk | percent_junk
templated = st.builds(lambda template, a, b: template.format(a, b), st.sampled_from(TEMPLATES), names, names)
paths = st.one_of(
    st.sampled_from(ROUTES), templated, templated, junk.map(lambda p: "/" + p), percent_junk.map(lambda p: "/" + p),
    st.sampled_from(["*", "http://evil.example/v1/models", "//v1/models", "/v1//models", "/./health", "/health/",
                     "/%68ealth", "/v1/models/../../status"]),
    # Past 64 KiB uvicorn's parser refuses the request line itself: the raw framing test sends those.
    st.integers(1_000, 60_000).map(lambda n: "/v1/models/" + "a" * n),
)
targets = st.builds(str.__add__, paths, st.sampled_from(QUERIES))

header_values = st.binary(max_size=120).map(lambda raw: bytes(c if 0x21 <= c != 0x7F else 0x2D for c in raw))
random_headers = st.dictionaries(st.text(_TOKEN_CHARS, min_size=1, max_size=24).filter(
    lambda name: name.lower() not in _RESERVED), header_values, max_size=6)
content_types = st.sampled_from([
    b"application/json", b"application/json; charset=utf-8", b"application/json; charset=latin-1", b"text/plain",
    b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b"*/*", b"application/json" + b";" * 200,
])
valid_keys = st.sampled_from([f"Bearer {CLIENT_KEY}", f"Bearer {ADMIN_KEY}"])
authorizations = valid_keys | valid_keys | st.sampled_from([  # two in three get past auth
    None, f"bearer {ADMIN_KEY}", f"Bearer  {CLIENT_KEY}", "Basic Zm9vOmJhcg==", "Bearer", "Bearer wrong-key",
    "Bearer " + "k" * 5000, CLIENT_KEY, f"Bearer {ADMIN_KEY},x",
])


@st.composite
def header_sets(draw: st.DrawFn, keyed: bool = False) -> dict[str, bytes]:
    headers = draw(random_headers)
    if draw(st.booleans()):
        headers["Content-Type"] = draw(content_types)
    if draw(st.booleans()):
        headers["Content-Encoding"] = draw(st.sampled_from([b"gzip", b"br", b"identity", b"x-junk"]))
    auth = draw(valid_keys if keyed else authorizations)
    if auth is not None:
        headers["Authorization"] = auth.encode()
    return headers


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
wrong_types = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
                        st.text(max_size=20), st.lists(st.integers(), max_size=3), st.just({}), st.just([]))
messages = st.one_of(st.just([{"role": "user", "content": "hello there"}]), wrong_types,
                     st.lists(st.fixed_dictionaries({"role": wrong_types | st.just("user"),
                                                     "content": wrong_types | json_values}), max_size=3))
openai_bodies = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(MODEL_NAMES) | wrong_types, "messages": messages, "prompt": wrong_types | json_values,
    "input": wrong_types | json_values, "stream": st.booleans() | wrong_types, "n": wrong_types,
    "max_tokens": wrong_types, "stream_options": wrong_types | st.just({"include_usage": True}),
}).map(lambda body: json.dumps(body).encode())


def nested(opener: str, depth: int, closed: bool) -> bytes:
    closer = "]" if opener.endswith("[") else "}"
    return (opener * depth + ("1" if opener.endswith(":") else "") + (closer * depth if closed else "")).encode()


deep_bodies = st.builds(nested, st.sampled_from(["[", '{"a":', '{"model":"chat","messages":[']),
                        st.sampled_from([10, 63, 64, 65, 500, 999, 1_000, 5_000, 100_000]), st.booleans())
huge_bodies = st.sampled_from([100_000, 1_000_000, 3_000_000]).map(lambda n: json.dumps(
    {"model": "chat", "messages": [{"role": "user", "content": "x" * n}]}).encode())
invalid_utf8 = st.binary(min_size=1, max_size=40).map(
    lambda raw: b'{"model": "chat", "messages": [{"role": "user", "content": "' + raw + b'\xff\xfe\xc0"}]}')
bodies = st.one_of(st.just(b""), st.binary(max_size=2_000), json_values.map(lambda v: json.dumps(v).encode()),
                   openai_bodies, openai_bodies, deep_bodies, deep_bodies, huge_bodies, invalid_utf8)


@settings(FUZZ, max_examples=160)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]), target=targets,
       headers=header_sets(), body=bodies)
def test_any_request_gets_a_sane_answer(http: httpx.Client, method: str, target: str,
                                        headers: dict[str, bytes], body: bytes) -> None:
    sent = Sent(method, target, headers, body)
    check(sent, exchange(http, sent))


@settings(FUZZ, max_examples=150)
@given(route=st.sampled_from([*ROUTES[:5], "/upstream/chat/v1/chat/completions", "/upstream/crashy/v1/completions",
                              "/upstream/resets/v1/chat/completions"]), headers=header_sets(keyed=True), body=bodies)
@example(route="/v1/chat/completions", headers=KEYED, body=b"[" * 100_000)
@example(route="/v1/chat/completions", headers=KEYED, body=b'{"model": "resets", "messages": [], "stream": true}')
def test_keyed_bodies_reach_the_data_path(http: httpx.Client, route: str, headers: dict[str, bytes],
                                          body: bytes) -> None:
    if route.startswith("/upstream/"):  # admin scope: the admin key takes it past auth
        headers = {**headers, "Authorization": f"Bearer {ADMIN_KEY}".encode()}
    sent = Sent("POST", route, headers, body)
    check(sent, exchange(http, sent))


# -- malformed framing, on raw sockets ----------------------------------------------------

_CHAT = b'{"model":"chat","messages":[{"role":"user","content":"hi"}]}'


def framings(body: bytes) -> dict[str, tuple[list[bytes], bytes]]:
    """Framing headers and payload for ``body`` by name: correct, or broken in the way the name says."""
    size = str(len(body)).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    te, cl = b"Transfer-Encoding: ", b"Content-Length: "
    return {
        "length": ([cl + size], body), "short-length": ([cl + b"1"], body),
        "long-length": ([cl + str(len(body) + 10).encode()], body), "junk-length": ([cl + b"abc"], body),
        "negative-length": ([cl + b"-1"], body), "huge-length": ([cl + b"99999999999999999999"], body),
        "listed-length": ([cl + size + b", " + size], body), "two-lengths": ([cl + size, cl + b"0"], body),
        "chunked": ([te + b"chunked"], chunked), "bad-chunk-size": ([te + b"chunked"], b"zz\r\n" + chunked),
        "huge-chunk": ([te + b"chunked"], b"ffffffffffffffffff\r\n" + body),
        "unterminated-chunks": ([te + b"chunked"], chunked[:-5]),
        "chunked-and-length": ([te + b"chunked", cl + b"3"], chunked),
        "gzip-chunked": ([te + b"gzip, chunked"], chunked), "chunked-gzip": ([te + b"chunked, gzip"], chunked),
        "no-length": ([], body),
        "websocket": ([b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="], b""),
        "h2c": ([b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAAQAAP__"], b""),
    }


ODDITIES = {  # one more part of the request made odd (or none)
    "method": [b"post", b"FOO", b"PRI", b"G\x00T", b""],
    "target": [b"*", b"/\xff\xfe", b"/a\x00b", b"/a b", b"http://evil.example/v1/models", b"/v1/x" + b"a" * 70_000],
    "version": [b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 x", b""],
    "header": [b"X-No-Colon", b"X-Nul: a\x00b", b" folded: continuation", b"X Space: 1", b"X-Latin: \xe9\xff",
               b": empty-name", b"X-Long: " + b"v" * 70_000],
    "eol": [b"\n"],
    "none": [b""],
}


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(what is odd, the bytes of one request): its framing and at most one other part broken or odd."""
    body = draw(st.sampled_from([_CHAT, _CHAT.replace(b"chat", b"resets"), b"", b"{"]) | st.binary(max_size=100))
    kind = draw(st.sampled_from(["length", *framings(b"")]))
    framing, payload = framings(body)[kind]
    part = draw(st.sampled_from([*ODDITIES, "none", "none"]))
    odd = draw(st.sampled_from(ODDITIES[part]))
    line = [odd if part == name else usual for name, usual in
            (("method", b"POST"), ("target", b"/v1/chat/completions"), ("version", b"HTTP/1.1"))]
    eol = odd if part == "eol" else b"\r\n"
    key = draw(st.sampled_from([CLIENT_KEY, ADMIN_KEY])).encode()
    lines = [b" ".join(p for p in line if p), b"Host: 127.0.0.1", b"Authorization: Bearer " + key, *framing,
             *([odd] if part == "header" else [])]
    return f"{kind}, odd {part}", eol.join(lines) + eol + eol + payload


def raw_exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``; the bytes answered, b"" if the server closed without answering.
    After 1 s of silence it half-closes, so a server waiting for more body sees the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        with contextlib.suppress(OSError):  # closed before reading it all: what it answered is read below
            sock.sendall(payload)
        data, half_closed = b"", False
        while not _answer_complete(data):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                assert not half_closed, f"neither answered nor closed 10 s after the request ended: {payload!r}"
                sock.shutdown(socket.SHUT_WR)
                half_closed = True
                sock.settimeout(10.0)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


def _answer_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")  # chunked; an answer with neither ends at EOF


@settings(FUZZ, max_examples=60)
@given(raw=raw_requests())
def test_malformed_framing_gets_an_answer_or_a_close(http: httpx.Client, raw: tuple[str, bytes]) -> None:
    odd, payload = raw
    data = raw_exchange(http.base_url.port or 80, payload)
    if not data:
        return  # closing is a fair answer to a request that never ended or made no sense
    assert data.startswith(b"HTTP/1.1 "), f"not an HTTP answer: {data[:300]!r}\nrequest: {payload[:500]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
    answer = Answer(int(head.split(b" ")[1]), fields.get(b"content-type", b"").decode("latin-1"), body)
    # A refused upgrade is the protocol handler's handshake answer, before any route: no envelope.
    handshake = odd.startswith(("websocket", "h2c")) and 400 <= answer.status < 500
    check_status(answer, f"request ({odd}): {payload[:500]!r}{answer.describe()}", body_expected=not handshake,
                 parser_may_refuse=True)


def test_orchestrator_survived_the_fuzzing(orch: Orchestrator) -> None:
    """Runs last in this module: still up and serving (the fixture checks for leaks when it stops)."""
    assert orch.process.poll() is None, f"orchestrator exited with {orch.process.returncode}:\n{orch.log()}"
    health = httpx.get(orch.url + "/health", timeout=10)
    assert health.status_code == 200, health.text
    answer = httpx.post(orch.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                        json={"model": "chat", "messages": [{"role": "user", "content": "still here"}]}, timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "still here", answer.text

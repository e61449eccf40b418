"""A fake Hugging Face hub on loopback that serves files the way huggingface.co does.

It answers exactly the requests huggingface_hub's `snapshot_download` makes:

- `GET /api/models/{repo}/revision/{rev}`: model info; `sha` is the commit the revision points to.
- `GET /api/models/{repo}/tree/{commit}?recursive=...`: the file list (git oid, size, and `lfs.oid` =
  sha256 for LFS files).
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit` on every answer. A plain (git) file is
  served directly with `ETag` = its git blob sha1. An LFS file answers like the hub: a 302 to a
  "CDN" (a second server on another port, so huggingface_hub treats it as a foreign host and drops
  the Authorization header) with `X-Linked-Etag` = sha256 of the content and `X-Linked-Size`.
- `GET /cdn/{sha256}` on the CDN server: the LFS content, with `Range` support (206 + Content-Range).
- Errors carry the hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
  which is how huggingface_hub picks its exception classes.

Knobs for tests: `fail_after_bytes` (the next LFS body is cut after that many bytes by closing the
connection; fires once), `stall_after_bytes` (the next LFS body stops after that many bytes and hangs
until `stop()`, setting the `stalled` event, so a client can be killed mid-file), `corrupt` (paths
whose served bytes differ from the advertised hash), a repo's `gated_token` (resolve needs
`Authorization: Bearer <token>`), and `seen`, every request received (method, path, Range header,
whether it carried a token).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the hub reports as the ETag of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FakeFile:
    path: str
    content: bytes
    lfs: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores instead of the content."""
        text = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n"
        return text.encode()

    @property
    def git_oid(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs else self.content)

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": len(self.content), "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    commit: str
    gated_token: str | None = None

    @classmethod
    def small(cls, repo_id: str, *, seed: int = 0, weights_kb: int = 300, gated_token: str | None = None) -> FakeRepo:
        """config.json and tokenizer.json (plain git files) and model.safetensors (random bytes, LFS)."""
        rng = random.Random(f"{repo_id}/{seed}")
        files = [
            FakeFile("config.json", json.dumps({"model_type": "fake", "seed": seed}).encode()),
            FakeFile("tokenizer.json", json.dumps({"version": "1.0", "vocab": list("abcdef")}).encode()),
            FakeFile("model.safetensors", rng.randbytes(weights_kb * 1024), lfs=True),
        ]
        return cls(repo_id, {f.path: f for f in files}, f"{rng.getrandbits(160):040x}", gated_token)

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision in ("main", self.commit) else None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    authorized: bool


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer, cdn: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.cdn = cdn

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@dataclass
class HubServer:
    repos: list[FakeRepo]
    fail_after_bytes: int | None = None
    stall_after_bytes: int | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    corrupt: set[str] = field(default_factory=set)
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _servers: list[_Server] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return self._servers[0].url

    def start(self) -> HubServer:
        self._servers = [_Server(self, cdn=False), _Server(self, cdn=True)]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def body_gets(self) -> list[Seen]:
        """GETs of file contents (resolve or CDN), the requests a cached file must not cause."""
        return [s for s in self.seen if s.method == "GET" and ("/resolve/" in s.path or s.path.startswith("/cdn/"))]

    def repo(self, repo_id: str) -> FakeRepo | None:
        return next((r for r in self.repos if r.repo_id == repo_id), None)

    def lfs_file(self, sha256: str) -> FakeFile | None:
        return next((f for r in self.repos for f in r.files.values() if f.lfs and f.sha256 == sha256), None)

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def take_failure(self) -> tuple[int | None, bool]:
        """(bytes to send before giving up, whether to hang instead of closing); each knob fires once."""
        with self._lock:
            stall = self.stall_after_bytes is not None
            cut = self.stall_after_bytes if stall else self.fail_after_bytes
            if stall:
                self.stall_after_bytes = None
            else:
                self.fail_after_bytes = None
            return cut, stall

    def hang(self) -> None:
        self.stalled.set()
        self._stopping.wait(30)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub, path = self.server.hub, urlsplit(self.path).path
        hub.record(Seen(self.command, path, self.headers.get("Range"), "Authorization" in self.headers))
        if self.server.cdn:
            found = hub.lfs_file(path.removeprefix("/cdn/")) if path.startswith("/cdn/") else None
            if found is None:
                return self._error(404, "EntryNotFound", "no such object")
            return self._content(found, {})
        if path.startswith("/api/models/"):
            return self._api(path.removeprefix("/api/models/"))
        if "/resolve/" in path:
            return self._resolve(*path[1:].split("/resolve/", 1))
        return self._error(404, "", "not a hub route")

    def _repo_and_commit(self, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
        repo = self.server.hub.repo(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        commit = repo.resolve(unquote(revision))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
            return None
        return repo, commit

    def _api(self, rest: str) -> None:
        for marker in ("/revision/", "/tree/"):
            if marker in rest:
                repo_id, revision = rest.split(marker, 1)
                break
        else:
            return self._error(404, "RepoNotFound", "Repository not found")
        found = self._repo_and_commit(repo_id, revision)
        if found is None:
            return None
        repo, commit = found
        if marker == "/tree/":
            return self._json([f.tree_entry() for f in repo.files.values()])
        siblings = [{"rfilename": name} for name in repo.files]
        gated = "manual" if repo.gated_token else False
        return self._json({"id": repo.repo_id, "sha": commit, "private": False, "gated": gated, "siblings": siblings})

    def _resolve(self, repo_id: str, rest: str) -> None:
        revision, _, filename = rest.partition("/")
        found = self._repo_and_commit(repo_id, revision)
        if found is None:
            return None
        repo, commit = found
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return self._error(401, "GatedRepo", message)
        file = repo.files.get(unquote(filename))
        if file is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        if not file.lfs:
            return self._content(file, {"X-Repo-Commit": commit})
        cdn = self.server.hub._servers[1].url
        self._send(302, b"", {
            "Location": f"{cdn}/cdn/{file.sha256}?X-Amz-Signature=fake",
            "X-Repo-Commit": commit, "ETag": f'"{file.git_oid}"',
            "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.content)),
        })
        return None

    def _content(self, file: FakeFile, headers: dict[str, str]) -> None:
        data = file.content
        if file.path in self.server.hub.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]  # same size, different hash
        headers = {**headers, "ETag": f'"{file.sha256 if file.lfs else file.git_oid}"', "Accept-Ranges": "bytes"}
        start, status = _range_start(self.headers.get("Range"), len(data)), 200
        if start:
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        cut, stall = self.server.hub.take_failure() if file.lfs and self.command == "GET" else (None, False)
        if cut is None or cut >= len(body):
            return self._send(status, body, headers)
        self._send(status, body[:cut], headers, content_length=len(body))
        if stall:
            self.server.hub.hang()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # the client sees EOF before Content-Length bytes
        return None

    def _json(self, payload: Any) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, "Content-Type": "application/json", **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), extra)

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_length: int | None = None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.wfile.flush()


def _range_start(header: str | None, size: int) -> int:
    """The first byte of `Range: bytes=N-` (the only form huggingface_hub sends); 0 if absent."""
    if not header or not header.startswith("bytes="):
        return 0
    first = header.removeprefix("bytes=").split("-", 1)[0]
    return int(first) if first.isdigit() and int(first) < size else 0


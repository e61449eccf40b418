#!/usr/bin/env python3
"""Download model repositories from the Hugging Face hub into the HF cache, verified and idempotent.

    python scripts/download_models.py [options] REPO_ID[@REVISION] ...
    python scripts/download_models.py [options] --config model-orchestrator/models.yaml

- ``--config`` downloads the ``weights`` of every model a models.yaml serves, each with its own
  allow/ignore patterns (the playbook's `models` tag does this with the served profile).

- A model whose snapshot is already complete in the cache is skipped without any network access
  (huggingface_hub's cached tree listing says which files the snapshot must hold). So a branch such
  as main is resolved once; --refresh asks the hub again (or pin a commit: REPO_ID@<sha>).
- Downloads show huggingface_hub's progress bars. An interrupted transfer is resumed with an HTTP
  Range request by huggingface_hub, within the run; files completed by an earlier run are kept.
- Every downloaded file is checked against the hash the hub advertised (its ETag, which names the
  cache blob): sha256 for LFS files, the git blob sha1 for the others. A mismatch deletes the file
  and fails, naming it.
- HF_TOKEN (or --token-env NAME) is sent for gated or private models and never printed.

Exit status: 0 when every model is complete, 1 otherwise (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout  # a dependency of huggingface_hub, and the lock it takes per blob
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    DryRunError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class ChecksumError(Exception):
    """A downloaded file does not match the hash the hub advertised for it."""


@dataclass(frozen=True)
class Spec:
    repo_id: str
    revision: str
    allow: tuple[str, ...] | None = None  # this repo's own patterns (from --config); else the options'
    ignore: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> Spec:
        repo_id, at, revision = text.partition("@")
        if not REPO_ID.fullmatch(repo_id) or (at and not revision):
            raise argparse.ArgumentTypeError(f"not a model spec (REPO_ID[@REVISION]): {text!r}")
        return cls(repo_id, revision or "main")

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    def patterns(self, opts: Options) -> dict[str, list[str] | None]:
        """snapshot_download's allow/ignore arguments for this repo."""
        allow = list(self.allow) if self.allow else opts.allow
        ignore = list(self.ignore) if self.ignore else opts.ignore
        return {"allow_patterns": allow, "ignore_patterns": ignore}


def specs_from_config(path: Path) -> list[Spec]:
    """The ``weights`` of every model in a models.yaml (the one list of what a profile loads)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: `core`
    import yaml

    from core.config.render import downloads

    return [Spec(d["repo"], d["revision"], tuple(d["allow_patterns"]) or None, tuple(d["ignore_patterns"]) or None)
            for d in downloads(yaml.safe_load(path.read_text()))]


@dataclass(frozen=True)
class Options:
    cache_dir: str
    endpoint: str | None
    token: str | None
    token_env: str
    allow: list[str] | None
    ignore: list[str] | None
    verify_all: bool
    refresh: bool = False


@dataclass
class Outcome:
    status: str  # present | downloaded | complete | missing | planned | failed
    path: str | None = None
    downloaded_bytes: int = 0
    error: str | None = None


def log(message: str) -> None:
    print(f"download_models: {message}", file=sys.stderr, flush=True)


def storage_folder(spec: Spec, opts: Options) -> Path:
    return Path(opts.cache_dir) / repo_folder_name(repo_id=spec.repo_id, repo_type="model")


def local_snapshot(spec: Spec, opts: Options) -> str | None:
    """The snapshot folder if it holds every wanted file; no network. None when incomplete or unknown."""
    try:
        path = snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=opts.cache_dir,
                                 local_files_only=True, **spec.patterns(opts))
    except LocalEntryNotFoundError:  # no snapshot, or the cached tree listing shows missing files
        return None
    # Without the cached tree listing huggingface_hub cannot tell a partial snapshot from a full one.
    tree = storage_folder(spec, opts) / "trees" / f"{Path(path).name}.json"
    return path if tree.is_file() else None


def file_digest(path: Path, expected: str) -> str | None:
    """The digest of `path` in the form of `expected` (sha256 or git blob sha1); None if neither."""
    if SHA256.fullmatch(expected):
        digest = hashlib.sha256()
    elif GIT_SHA1.fullmatch(expected):
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
    else:
        return None
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_snapshot(snapshot: str) -> None:
    """Hash every file of the snapshot against its blob name (the hub's ETag); delete and raise on mismatch."""
    bad = []
    for link in sorted(p for p in Path(snapshot).rglob("*") if p.is_file()):
        blob = link.resolve()
        if not blob.is_file():  # shared a blob with a file found bad just before
            link.unlink()
            continue
        actual = file_digest(blob, blob.name)
        if actual is not None and actual != blob.name:
            kind = "sha256" if SHA256.fullmatch(blob.name) else "git sha1"
            bad.append(f"{link.relative_to(snapshot)} ({kind}: expected {blob.name}, got {actual})")
            blob.unlink()
            link.unlink()
    if bad:
        raise ChecksumError(f"checksum mismatch, deleted (re-run to download again): {'; '.join(bad)}")


def blob_sizes(spec: Spec, opts: Options) -> dict[str, int]:
    blobs = storage_folder(spec, opts) / "blobs"
    if not blobs.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in blobs.iterdir() if p.is_file() and p.suffix != ".incomplete"}


def remove_stale_partials(spec: Spec, opts: Options) -> None:
    """Delete temp files left by killed runs (huggingface_hub never reuses them), unless a download holds them."""
    folder = storage_folder(spec, opts)
    for partial in sorted((folder / "blobs").glob("*.incomplete")):
        lock = Path(opts.cache_dir) / ".locks" / folder.name / f"{partial.name.split('.')[0]}.lock"
        try:
            with FileLock(lock, timeout=0, mode=0o664):
                partial.unlink(missing_ok=True)
            log(f"{spec}: removed {partial.name}, left by an interrupted run")
        except (Timeout, NotImplementedError):  # being downloaded now, or no flock on this filesystem
            continue


def ensure(spec: Spec, opts: Options) -> Outcome:
    """Make the snapshot complete: skip it if it already is (offline), else download and verify."""
    present = None if opts.refresh else local_snapshot(spec, opts)
    if present is not None:
        if not opts.verify_all:
            return Outcome("present", present)
        try:
            verify_snapshot(present)
            return Outcome("present", present)
        except ChecksumError as exc:
            log(f"{spec}: {exc}")
    remove_stale_partials(spec, opts)
    before = blob_sizes(spec, opts)
    path = snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=opts.cache_dir, endpoint=opts.endpoint,
                             token=opts.token, **spec.patterns(opts))
    verify_snapshot(path)
    new = {name: size for name, size in blob_sizes(spec, opts).items() if name not in before}
    return Outcome("downloaded" if new else "present", path, sum(new.values()))


def check(spec: Spec, opts: Options) -> Outcome:
    present = local_snapshot(spec, opts)
    if present is None:
        return Outcome("missing")
    if opts.verify_all:
        verify_snapshot(present)
    return Outcome("complete", present)


def plan(spec: Spec, opts: Options) -> Outcome:
    files = snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=opts.cache_dir, endpoint=opts.endpoint,
                              token=opts.token, dry_run=True, **spec.patterns(opts))
    todo = [f for f in files if f.will_download]
    size = sum(f.file_size or 0 for f in todo)
    log(f"{spec}: {len(todo)} of {len(files)} files to download, {size / 1e9:.2f} GB")
    return Outcome("planned", downloaded_bytes=size)


def describe(exc: BaseException, spec: Spec, opts: Options) -> str:
    """A one-line reason an operator can act on (never includes the token)."""
    if isinstance(exc, DryRunError) and exc.__cause__ is not None:
        return describe(exc.__cause__, spec, opts)
    where = opts.endpoint or constants.ENDPOINT
    if isinstance(exc, HfHubHTTPError):
        return describe_http(exc, spec, opts, where)
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or "Connect" in type(exc).__name__:
        cause = exc.__cause__ or exc
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{type(cause).__name__}: {cause}"
        return f"endpoint unreachable: {where} ({reason.splitlines()[0]}); {spec} is not complete in {opts.cache_dir}"
    if isinstance(exc, ChecksumError):
        return str(exc)
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return f"size mismatch after download (re-run to retry): {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {exc}"


def describe_http(exc: HfHubHTTPError, spec: Spec, opts: Options, where: str) -> str:
    if isinstance(exc, GatedRepoError):
        if opts.token:
            return f"{spec.repo_id} is gated and the token in ${opts.token_env} has no access: accept its terms"
        return f"set {opts.token_env} (model is gated): {spec.repo_id} needs a token with access"
    if isinstance(exc, RevisionNotFoundError):
        return f"unknown revision {spec.revision!r} of {spec.repo_id} on {where}"
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if opts.token else f"; if it is private or gated, set {opts.token_env}"
        return f"unknown repository {spec.repo_id} on {where}{hint}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"a file is missing on {where}: {str(exc).splitlines()[-1]}"
    status = exc.response.status_code if exc.response is not None else "?"
    hint = f" (set {opts.token_env}: model is gated or private)" if status in (401, 403) else ""
    return f"{where} answered HTTP {status}{hint}: {str(exc).splitlines()[0]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", type=Spec.parse, metavar="REPO_ID[@REVISION]")
    parser.add_argument("--config", type=Path, metavar="MODELS_YAML",
                        help="download the weights every model of this models.yaml loads")
    parser.add_argument("--cache-dir", default=constants.HF_HUB_CACHE,
                        help="HF hub cache (default: $HF_HUB_CACHE, else $HF_HOME/hub; now %(default)s)")
    parser.add_argument("--endpoint", default=None, help="hub URL (default: $HF_ENDPOINT, else huggingface.co)")
    parser.add_argument("--allow-patterns", action="append", metavar="GLOB", help="only files matching (repeatable)")
    parser.add_argument("--ignore-patterns", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    parser.add_argument("--token-env", default="HF_TOKEN", metavar="NAME",
                        help="environment variable holding the hub token (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report which models are complete locally (no network)")
    mode.add_argument("--dry-run", action="store_true", help="list what would be downloaded, with sizes (network)")
    parser.add_argument("--verify", action="store_true", help="also re-hash files already in the cache")
    parser.add_argument("--refresh", action="store_true", help="ask the hub what the revision points to now")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line on stdout")
    args = parser.parse_args(argv)
    if args.config is not None:
        args.specs += specs_from_config(args.config)
    if not args.specs and args.config is None:
        parser.error("name models (REPO_ID[@REVISION]) or a models.yaml with --config")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(cache_dir=args.cache_dir, endpoint=args.endpoint.rstrip("/") if args.endpoint else None,
                   token=os.environ.get(args.token_env) or None, token_env=args.token_env,
                   allow=args.allow_patterns, ignore=args.ignore_patterns, verify_all=args.verify,
                   refresh=args.refresh)
    action = check if args.check else plan if args.dry_run else ensure
    outcomes: dict[str, Outcome] = {}
    for spec in dict.fromkeys(args.specs):
        try:
            outcomes[str(spec)] = outcome = action(spec, opts)
        except Exception as exc:  # every failure becomes a message and exit status 1
            outcomes[str(spec)] = outcome = Outcome("failed", error=describe(exc, spec, opts))
        detail = f": {outcome.error}" if outcome.error else f" ({outcome.path})" if outcome.path else ""
        log(f"{spec}: {outcome.status}{detail}")
    failed = any(o.status in ("failed", "missing") for o in outcomes.values())
    if args.json:
        summary: dict[str, Any] = {"changed": any(o.status == "downloaded" for o in outcomes.values()),
                                   "failed": failed, "cache_dir": opts.cache_dir,
                                   "models": {name: asdict(o) for name, o in outcomes.items()}}
        print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

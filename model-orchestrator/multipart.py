"""The ``model`` of a ``multipart/form-data`` request (a transcription's upload), found without copying it.

OpenAI's upload routes (``/v1/audio/transcriptions``, ``/v1/audio/translations``) send a form: the
audio file and small fields, ``model`` among them, in any order (clients put it after the file as
often as before). The body is already in memory, read once within ``upload_body_mb``; this walks
its parts by their boundaries with ``bytes.find`` (no copy of the file part) and decodes only the
small fields asked for. The body is forwarded unchanged. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(rb';\s*name=(?:"([^"]*)"|([^\s;]+))', re.IGNORECASE)  # not filename=: it follows no ';\s*'
_FILENAME = re.compile(rb';\s*filename\*?=', re.IGNORECASE)
_HEADERS_MAX = 16 * 1024  # bytes of one part's headers
_VALUE_MAX = 4096  # bytes of a field read as text


class FormProblem(ValueError):
    """A body that is not the form its Content-Type says; the message says what is wrong."""


def is_form(content_type: bytes | None) -> bool:
    return content_type is not None and content_type[:19].lower() == b"multipart/form-data"


def boundary_of(content_type: bytes) -> bytes:
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise FormProblem("the multipart/form-data Content-Type has no boundary")
    return found.group(1) or found.group(2)


def form_fields(body: bytes, content_type: bytes, wanted: Iterable[str] = ("model", "stream")) -> dict[str, str]:
    """The text fields of ``body`` named in ``wanted`` (each at most 4 KiB); files are skipped, never copied.
    Raises FormProblem when the body does not parse as the form."""
    delimiter = b"--" + boundary_of(content_type)
    names = {name.encode() for name in wanted}
    fields: dict[str, str] = {}
    if not body.startswith(delimiter):
        raise FormProblem("the body does not start with the boundary its Content-Type names")
    position = len(delimiter)
    while not body.startswith(b"--", position):  # "--" after a delimiter closes the form
        name, is_file, start = _part_head(body, position)
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise FormProblem("a part of the form has no end: the closing boundary is missing")
        if name in names and not is_file and name.decode() not in fields:
            fields[name.decode()] = _text(body[start:min(end, start + _VALUE_MAX + 1)], name)
        position = end + 2 + len(delimiter)
    return fields


def _part_head(body: bytes, position: int) -> tuple[bytes, bool, int]:
    """(the part's field name, whether it is a file, where its content starts) for the part at ``position``."""
    if not body.startswith(b"\r\n", position):
        raise FormProblem("a boundary of the form is not followed by a line break")
    end = body.find(b"\r\n\r\n", position + 2, position + 2 + _HEADERS_MAX)
    if end < 0:
        raise FormProblem("a part of the form has no blank line after its headers (or headers over 16 KiB)")
    for line in body[position + 2:end].split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() == b"content-disposition":
            found = _NAME.search(value)
            if found is None:
                raise FormProblem("a part's Content-Disposition has no name")
            return found.group(1) if found.group(1) is not None else found.group(2), bool(
                _FILENAME.search(value)), end + 4
    raise FormProblem("a part of the form has no Content-Disposition header")


def _text(value: bytes, name: bytes) -> str:
    if len(value) > _VALUE_MAX:
        raise FormProblem(f"the form's {name.decode(errors='replace')!r} field is over {_VALUE_MAX} bytes")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise FormProblem(f"the form's {name.decode(errors='replace')!r} field is not UTF-8 text") from None

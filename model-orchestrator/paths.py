"""The one form of a request path that the orchestrator decides on and sends on. Pure; no I/O.

The ASGI server hands the app a percent-decoded path, and an HTTP client that forwarded
it would normalise it once more (yarl resolves dot-segments). Decided on one form and sent
in another, ``POST /v1/%2e%2e/offload`` passed as "a /v1 route" and reached the service's
private ``/offload``. So here the raw path is decoded exactly once, refused (400) when the
decoded form is one that any later layer could read as a different path, and otherwise that
decoded form is the only one used: the access policy, the routing and the upstream path all
read it, and the proxy sends it re-encoded (``upstream_target``) with nothing normalising it
again (yarl's ``encoded=True``).

Refused, as the client sent them or once decoded:

* a dot-segment (``.`` or ``..``) and an empty segment (``//``; a trailing ``/`` is fine);
* an encoded ``/`` (``%2F``) and, once decoded, a ``\\``, ``?``, ``#`` or ``%``: separators a
  server reads differently, or an escape left over (double encoding such as ``%252e``);
* control characters, bytes that are not UTF-8, and anything that does not start with ``/``.
"""

from __future__ import annotations

import re
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

from core.common.errors import ServiceError

# Anything that may need the careful path: an escape, a dot or empty segment, a backslash, a
# "#" (h11 keeps a fragment in the raw path), a byte outside printable ASCII. Most requests match
# none and are decoded as they are.
_SUSPECT = re.compile(rb"[%#\\\x00-\x20\x7f-\xff]|/\.|//")
_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN_DECODED = ("\\", "?", "#", "%")
# RFC 3986 pchar and "/": left as they are when the path is sent on; everything else is escaped.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?%"  # a query's own escapes pass through unchanged


def canonical_path(raw: bytes) -> str:
    """The decoded path of a request target (its query, if any, is ignored); a 400 ``invalid_path``
    ServiceError when the path is not in the one unambiguous form (see the module docstring)."""
    path = raw.partition(b"?")[0]
    if not path.startswith(b"/"):
        raise _invalid(path, "it must start with '/'")
    if _SUSPECT.search(path) is None:
        return path.decode("ascii")
    if _ENCODED_SLASH.search(path):
        raise _invalid(path, "it contains an encoded '/' (%2F)")
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(path, "it does not decode to UTF-8") from None
    for char in _FORBIDDEN_DECODED:
        if char in decoded:
            raise _invalid(path, f"once decoded it contains {char!r}")
    if _CONTROL.search(decoded):
        raise _invalid(path, "it contains a control character")
    segments = decoded.split("/")[1:]
    if any(segment in (".", "..") for segment in segments):
        raise _invalid(path, "it contains a '.' or '..' segment")
    if "" in segments[:-1]:
        raise _invalid(path, "it contains an empty segment ('//')")
    return decoded


def upstream_target(path: str) -> str:
    """``path`` (a ``canonical_path``) as sent to a service: escaped where it must be, nothing
    normalised. The service decodes it back to exactly ``path``."""
    return quote(path, safe=_PATH_SAFE)


def upstream_query(query: bytes) -> str:
    """A request's query string as sent on: its bytes unchanged, but for escaping any byte that
    may not stand in a request line (the client's own escapes are kept)."""
    return quote_from_bytes(query, safe=_QUERY_SAFE)


def _invalid(path: bytes, why: str) -> ServiceError:
    shown = path[:200].decode("ascii", "backslashreplace")
    return ServiceError(400, f"The request path {shown!r} is not accepted: {why}. Send the plain path, "
                        "with no dot-segments and no encoded separators.", "invalid_path")

"""Secrets out of what leaseflow prints: :func:`shown` masks every password of a URL or DSN.

Pure (no I/O). It errs on the side of hiding: where parsers disagree on where a password
ends (an unencoded ``@`` in it, say), everything any of them could take for the
password is masked, and a little more may go with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote, unquote_plus

MASK = "***"
#: Connection parameters that carry a secret, as URL query keys or libpq ``key=value``.
SECRET_KEYS = frozenset({"password", "sslpassword", "passwd"})

_URL_START = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.:\-]*://")
#: A query parameter: its key and its value (up to the next ``&``).
_QUERY_PARAM = re.compile(r"[?&](?P<key>[^&=?]*)=(?P<value>[^&]*)")
#: A libpq ``key = value``: a value is quoted (``\\`` escapes) or runs to a blank (the
#: ASCII ones only, as libpq's ``isspace``).
_DSN_PARAM = re.compile(
    r"(?<![^ \t\n\r\f\v])(?P<key>[A-Za-z_]+)[ \t\n\r\f\v]*=[ \t\n\r\f\v]*"
    r"(?P<value>'(?:\\.|[^'\\])*'?\\?|(?:\\.|[^ \t\n\r\f\v\\])*\\?)",
    re.S,
)


def shown(url: str) -> str:
    """``url`` (a URL or a libpq ``key=value`` string) with every password replaced by ``***``.

    Covers ``scheme://user:password@host`` (an unencoded ``@`` in the password too),
    ``?password=`` / ``&password=`` in a query string (and ``sslpassword``), and
    ``password=...`` in a libpq string, quoted or not. Use it for every URL printed.
    """
    return _masked(url, list(_secret_spans(url)))


def scrubbed(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error message about ``url``) without ``url``'s passwords.

    ``url`` itself, should it appear, is shown masked; any password it holds (as written,
    or decoded) is masked wherever else it appears in ``text``.
    """
    text = text.replace(url, shown(url)) if url else text
    for secret in sorted(secrets(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def secrets(url: str) -> set[str]:
    """The passwords ``url`` holds: as written, and as a parser would decode them."""
    found = set()
    for start, end in _secret_spans(url):
        raw = url[start:end]
        found.update({raw, unquote(raw), unquote_plus(raw), _unescape_dsn_value(raw)})
    return {secret for secret in found if secret.strip()}


def _secret_spans(url: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each part of ``url`` that is (or may be) a password."""
    start = _URL_START.match(url)
    if start is not None:
        yield from _url_spans(url, start.end())
        return
    for match in _DSN_PARAM.finditer(url):
        if match.group("key").lower() in SECRET_KEYS:
            yield match.span("value")


def _url_spans(url: str, authority: int) -> Iterator[tuple[int, int]]:
    # The user information runs to the last "@": parsers differ on an unencoded "@" (or
    # "/", "?") in a password, so everything up to the last "@" past the first ":" goes.
    at = url.rfind("@", authority)
    colon = url.find(":", authority, at) if at >= 0 else -1
    if colon >= 0:
        yield colon + 1, at
    # Query parameters, wherever a "?" or "&" could start one: a key may be %-encoded.
    for match in _QUERY_PARAM.finditer(url, authority):
        if unquote_plus(match.group("key")).strip().lower() in SECRET_KEYS:
            yield match.span("value")


def _masked(url: str, spans: list[tuple[int, int]]) -> str:
    """``url`` with each span replaced by the mask (overlapping or adjacent ones as one)."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, pos = [], 0
    for start, end in merged:
        out += [url[pos:start], MASK]
        pos = end
    out.append(url[pos:])
    return "".join(out)


def _unescape_dsn_value(raw: str) -> str:
    """A libpq value as libpq reads it: quotes dropped, backslash escapes resolved."""
    if raw.startswith("'"):
        raw = raw[1:-1] if len(raw) > 1 and raw.endswith("'") else raw[1:]
    return re.sub(r"\\(.)", r"\1", raw, flags=re.S)

"""Keep passwords out of every line the process prints.

libpq echoes fragments of a malformed DSN in its error messages, URL parsers
echo the URL, and tracebacks print arguments: rather than trusting each source,
the CLI collects every password-looking part of the DSNs and URLs it was given
(even ones that do not parse) and replaces them in all output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

MASK = "***"
# The shortest secret that is masked: shorter ones would mangle ordinary words.
MIN_SECRET_LEN = 3

# userinfo of a URL, up to the last "@" before the host (a password may hold "/" or "#")
_URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://(\S*)@")
# libpq keyword form: password=secret or password='sec ret' (backslash escapes)
_KEYWORD = re.compile(r"\bpassword\s*=\s*(?:'((?:\\.|[^'\\])*)'?|(\S+))", re.IGNORECASE)
# URI query form: ?password=secret&...
_QUERY = re.compile(r"[?&]password=([^&\s]*)", re.IGNORECASE)


def secrets_in(value: str) -> list[str]:
    """Every substring of a DSN or URL that may be a password (parseable or not)."""
    found: list[str] = []
    for match in _URL_USERINFO.finditer(value):
        userinfo = match.group(1)
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            found += [password, unquote(password)]
    for match in _KEYWORD.finditer(value):
        quoted, bare = match.group(1), match.group(2)
        password = quoted if quoted is not None else bare
        found += [password, re.sub(r"\\(.)", r"\1", password)]
    for match in _QUERY.finditer(value):
        found += [match.group(1), unquote(match.group(1))]
    return [s for s in dict.fromkeys(found) if len(s) >= MIN_SECRET_LEN]


class Redactor:
    """Replaces known secrets in text; longest first, so a secret's prefix never leaks."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(*values)

    def add(self, *values: str) -> None:
        """Register the passwords found in these DSNs/URLs (or raw text)."""
        for value in values:
            if value:
                self._secrets.extend(secrets_in(value))
        self._secrets = sorted(set(self._secrets), key=len, reverse=True)

    def add_raw(self, *secrets: str) -> None:
        """Register passwords themselves (e.g. parsed out of a DSN by libpq)."""
        self._secrets.extend(s for s in secrets if len(s) >= MIN_SECRET_LEN)
        self._secrets = sorted(set(self._secrets), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def one_line(text: str) -> str:
    """Collapse a possibly multi-line message (libpq adds DETAIL/HINT lines) to one line."""
    parts = [part.strip() for part in text.strip().splitlines() if part.strip()]
    return "; ".join(parts)

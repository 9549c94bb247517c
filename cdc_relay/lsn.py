"""Log sequence numbers.

An LSN is a uint64 byte position in the WAL. It is an ``int`` subclass so that
comparisons and arithmetic stay as cheap as on plain integers on the hot path,
while ``str()`` gives the ``X/Y`` form Postgres prints and parses.
"""

from __future__ import annotations

import re

MAX_LSN = (1 << 64) - 1
# What Postgres' pg_lsn_in accepts: 1-8 ASCII hex digits, "/", 1-8 hex digits.
# (int(x, 16) alone would also take signs, "0x", "_", inner spaces and non-ASCII digits.)
_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


class Lsn(int):
    """A WAL position; orders like an int, prints like Postgres (``16/B374D848``)."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Lsn:
        if not 0 <= value <= MAX_LSN:
            raise ValueError(f"LSN out of range: {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse the ``X/Y`` hexadecimal form."""
        match = _LSN_TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"invalid LSN: {text!r}")
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


def format_lsn(value: int) -> str:
    """Format any int as ``X/Y`` without constructing an Lsn."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"

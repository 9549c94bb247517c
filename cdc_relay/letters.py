"""A dead letter as a value: what the core decides to store, bounded on construction.

Pure (no driver, no event loop), so ``core`` can build dead letters and stay
import-pure; ``deadletters`` stores them. The bounds are described in the
``deadletters`` module docstring.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cdc_relay import reasons
from cdc_relay.redact import one_line

# What one dead letter stores: a text field over FIELD_LIMIT bytes keeps its first
# PREFIX_CHARS characters, its size and its sha256 (the outbox table has the rest).
FIELD_LIMIT = 64 * 1024
PREFIX_CHARS = 1024
REASON_CHARS = 2000  # reasons come from us or the broker; a bound all the same


@dataclass(slots=True)
class DeadLetter:
    """One row that can never be published; what it stores is bounded on construction."""

    outbox_id: str | None
    reason: str
    row: dict[str, Any]
    lsn: int
    code: str = reasons.BAD_ROW  # the reason's label in metrics and logs (``reasons``)
    # The outbox table the row came from: its dead-letter table stores it ("" for the
    # first outbox's, e.g. a row of no outbox; see ``deadletters.DeadLetterWriter``).
    table: str = ""

    def __post_init__(self) -> None:
        if self.outbox_id is not None:
            self.outbox_id = _no_nul(self.outbox_id)
        reason = self.reason
        if len(reason) > REASON_CHARS:
            reason = reason[:REASON_CHARS] + "..."
        self.reason = _no_nul(reason)
        self.row = bounded_row(self.row)

    def unstorable(self, exc: BaseException) -> DeadLetter:
        """This dead letter without its row, for a row the server refuses to store.

        ``row_data`` is then ``{"unstorable": <the error>}``: the outbox table
        still holds the row; a replay cannot read it from here and says so.
        """
        # A psycopg error's primary message, read by duck type: this module imports no driver.
        diag = getattr(exc, "diag", None)
        primary = getattr(diag, "message_primary", None)
        text = one_line(primary or str(exc))[:500]
        return DeadLetter(
            self.outbox_id,
            self.reason,
            {"unstorable": f"{type(exc).__name__}: {text}"},
            self.lsn,
            self.code,
            self.table,
        )


def _no_nul(text: str) -> str:
    # Postgres text cannot hold NUL, and jsonb refuses the \u0000 escape.
    return text.replace("\x00", "\ufffd")


def bounded_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with each text field over FIELD_LIMIT bytes replaced (see the module docstring).

    Top-level text fields and the texts of top-level lists (an unreadable row's
    ``values``) are bounded; rows hold nothing deeper. NULs become U+FFFD.
    """
    truncated: list[str] = []
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, str):
            out[key] = _bounded_text(value, key, truncated)
        elif isinstance(value, list):
            out[key] = [
                _bounded_text(v, f"{key}[{i}]", truncated) if isinstance(v, str) else v
                for i, v in enumerate(value)
            ]
        else:
            out[key] = value
    if truncated:
        out["truncated"] = truncated
    return out


def _bounded_text(text: str, name: str, truncated: list[str]) -> Any:
    """The text itself (NUL-free), or its prefix, size and hash when it is over the bound."""
    if len(text) <= FIELD_LIMIT // 4:  # at most 4 bytes a character: surely within
        return _no_nul(text)
    data = text.encode("utf-8", "replace")
    if len(data) <= FIELD_LIMIT:
        return _no_nul(text)
    truncated.append(name)
    return {
        "prefix": _no_nul(text[:PREFIX_CHARS]),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@dataclass(slots=True)
class PendingDeadLetter:
    """A dead letter on its way to the table; its sequence number is confirmed once stored."""

    seq: int
    letter: DeadLetter

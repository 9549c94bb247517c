"""``cdc-relay status`` as a person reads it: pure rendering of ``SlotStatus.as_dict()``.

The text and ``--json`` come from the same dict (schema 1), so they cannot say
different things; here every value becomes words (yes/no, ``-`` for none,
sizes in KiB/MiB/GiB, a lag as bytes and as a duration) and never a Python repr.
No I/O and no psycopg: tested without servers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

NONE: Final = "-"

# (key in the schema-1 dict, label); None for a blank line between groups.
_PRIMARY_ROWS: Final = (
    ("role", "role"),
    ("slot", "slot"),
    ("slot_exists", "slot exists"),
    ("active", "relay attached"),
    ("active_client", "attached client"),
    ("plugin", "plugin"),
    ("database", "database"),
    ("failover", "failover slot"),
    ("wal_status", "WAL status"),
    ("confirmed_flush_lsn", "confirmed LSN"),
    ("current_wal_lsn", "current LSN"),
    ("lag", "lag"),
    ("retained_wal_bytes", "WAL retained"),
    ("safe_wal_size", "WAL room left"),
    ("publication", "publication"),
    ("publication_exists", "publication exists"),
    ("publication_tables", "published tables"),
    ("dead_letters_pending", "dead letters"),
    ("implementation", "hot path"),
    ("healthy", "healthy"),
)
_STANDBY_ROWS: Final = (
    ("role", "role"),
    ("slot", "slot"),
    ("slot_exists", "slot copy exists"),
    ("failover", "failover slot"),
    ("synced", "synced"),
    ("temporary", "temporary"),
    ("failover_ready", "ready for failover"),
    ("confirmed_flush_lsn", "confirmed LSN"),
    ("replay_lsn", "replayed LSN"),
    ("implementation", "hot path"),
    ("healthy", "healthy"),
)
_SIZES: Final = ("retained_wal_bytes", "safe_wal_size")


def size(n: int | None) -> str:
    """Bytes as a person reads them: exact below 1 KiB, else one decimal in KiB/MiB/GiB."""
    if n is None:
        return NONE
    if abs(n) < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """Seconds as ``45s``, ``12m 5s``, ``3h 2m`` or ``2d 4h`` (``-`` when unknown)."""
    if seconds is None:
        return NONE
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def word(value: Any) -> str:
    """One value as text: yes/no, ``-`` for none or empty, lists joined by commas."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(word(v) for v in value) if value else NONE
    return str(value)


def lag(fields: Mapping[str, Any]) -> str:
    """The unconfirmed WAL in bytes, and in time where the relay recorded a commit."""
    lag_bytes = fields.get("lag_bytes")
    if lag_bytes is None:
        return NONE
    text = (
        f"{lag_bytes:,} bytes" if lag_bytes < 1024 else f"{lag_bytes:,} bytes ({size(lag_bytes)})"
    )
    seconds = fields.get("lag_seconds")
    if seconds is not None and lag_bytes > 0:
        text += f", newest confirmed commit {duration(seconds)} ago"
    return text


def _table_lines(tables: list[Mapping[str, Any]]) -> list[str]:
    """With several outboxes on the slot: one line per table (published? dead letters)."""
    if len(tables) < 2:
        return []
    lines = [f"{'outbox tables:':21} {len(tables)}"]
    for table in tables:
        if not table.get("dead_letter_table_exists"):
            letters = "no dead-letter table"
        else:
            letters = f"{word(table.get('dead_letters_pending'))} dead letter(s) pending"
        published = "published" if table.get("in_publication") else "NOT in the publication"
        lines.append(f"  {table.get('table')}: {published}, {letters}")
    return lines


def render_text(fields: Mapping[str, Any]) -> list[str]:
    """The lines ``status`` prints: one ``label: value`` per line, then the one problem list.

    Warnings are not here: ``status`` writes them to stderr, in text and JSON alike.
    """
    rows = _STANDBY_ROWS if fields.get("role") == "standby" else _PRIMARY_ROWS
    lines = []
    for key, label in rows:
        if key == "lag":
            value = lag(fields)
        elif key in _SIZES:
            value = size(fields.get(key))
        elif key == "dead_letters_pending" and fields.get("dead_letter_table_exists") is False:
            value = "no dead-letter table"
        elif key == "dead_letters_pending" and fields.get(key) is not None:
            value = f"{fields[key]} pending"
        else:
            value = word(fields.get(key))
        lines.append(f"{label + ':':21} {value}")
        if key == "dead_letters_pending":
            lines += _table_lines(fields.get("tables") or [])
    problems = list(fields.get("problems") or [])
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  - {problem}" for problem in problems]
    else:
        lines.append(f"{'problems:':21} none")
    return lines

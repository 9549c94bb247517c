"""The resync guard: no relay streams from a slot while a resync fills it, or after one died.

While a resync reads its snapshot, its new slot is idle; a relay that took it
would confirm past rows the snapshot has not sent yet. ``resync`` holds a
session advisory lock (``resync_lock_key``) while it runs, and marks the state
row (``state.mark_resync``) until it finished: the lock tells "under way"
(wait) from "interrupted" (rerun it, ``resync_command``). ``pg.checks`` and
``opening`` ask here before a relay streams; ``resync`` takes the lock.
"""

from __future__ import annotations

import zlib
from datetime import datetime
from typing import Any, Final

import psycopg

from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.state import RelayState, format_since, read, slot_option, table_name

RESYNC_LOCK_CLASS: Final = 0x63647273  # "cdrs": the first key of every resync's advisory lock


def resync_lock_key(slot: str) -> tuple[int, int]:
    """The two int4 keys of the session advisory lock a resync of ``slot`` holds.

    Non-negative, so that pg_locks (which shows them as oids) shows the same numbers.
    """
    return RESYNC_LOCK_CLASS, zlib.crc32(slot.encode()) & 0x7FFFFFFF


def resync_holder(conn: psycopg.Connection[Any], slot: str) -> int | None:
    """The pid of the resync of ``slot`` running now (it holds the lock), or None.

    The lock, not the state row, tells "under way" from "interrupted": Postgres
    releases it when the resync's connection ends, however the process died.
    """
    key1, key2 = resync_lock_key(slot)
    row = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = %s::oid AND objid = %s::oid AND objsubid = 2",
        (key1, key2),
    ).fetchone()
    return None if row is None else int(row[0])


class ResyncUnderWay(ConfigError):
    """A resync of the slot runs now: a relay stands by until it finished."""


def resync_command(settings: Settings, since: datetime) -> str:
    """The exact command that finishes an interrupted resync (from where it started)."""
    return f"cdc-relay resync{slot_option(settings)} --since {format_since(since)}"


def resync_problem(
    settings: Settings, recorded: RelayState | None, holder: int | None
) -> ResyncUnderWay | ConfigError | None:
    """Why no relay may stream from the slot now, or None (decided from the row and the lock).

    While a resync reads its snapshot, its new slot is idle, and a relay that
    took it would confirm past the rows the snapshot has not sent yet; if the
    resync then died, rerunning it would be refused (the slot is in use) and
    those rows would never be sent. So: under way, wait; interrupted, rerun it.
    """
    if holder is not None:
        since = (
            ""
            if recorded is None or recorded.resync_since is None
            else (f" from {format_since(recorded.resync_since)}")
        )
        return ResyncUnderWay(
            f"a resync of replication slot {settings.slot}{since} is under way (pid {holder}): "
            "no relay may stream from the slot until it has finished"
        )
    if recorded is not None and recorded.resync_since is not None:
        command = resync_command(settings, recorded.resync_since)
        return ConfigError(
            f"replication slot {settings.slot} was created by a resync that did not finish "
            "(none runs now): rows of its snapshot may never have been sent, and streaming "
            f"from the slot would skip them for good; run `{command}`"
            " (it drops this slot and sends everything again), then start the relay"
        )
    return None


def check_no_resync(conn: psycopg.Connection[Any], settings: Settings) -> ConfigError | None:
    """Raise ResyncUnderWay or ConfigError when a resync is under way or was interrupted.

    A role that may not read the state table gets the error returned, for the
    caller to raise after its other checks (a missing grant is reported in the
    order validation finds them); the lock alone still makes a relay wait.
    """
    unreadable: ConfigError | None = None
    try:
        recorded = read(conn, table_name(settings), settings.slot)
    except psycopg.errors.InsufficientPrivilege:
        row = conn.execute("SELECT current_user").fetchone()
        user = row[0] if row else "this role"
        recorded, unreadable = (
            None,
            ConfigError(
                f"role {user} lacks SELECT on {'.'.join(table_name(settings))} (it tells whether "
                f"a resync of slot {settings.slot} is unfinished); run `cdc-relay init --grant-to "
                f"{user}` as an admin"
            ),
        )
    problem = resync_problem(settings, recorded, resync_holder(conn, settings.slot))
    if problem is not None:
        raise problem
    return unreadable

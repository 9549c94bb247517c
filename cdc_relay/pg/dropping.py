"""Whether ``cdc-relay drop`` may drop the slot: what the slot still holds, and who holds it.

Dropping a slot throws away every change it has not had confirmed: outbox rows
committed after the relay's last confirmed position are then never published.
``SlotHold`` is what was read (``read_hold``); the decision (``refusal``) and the
command that republishes what was dropped (``resync_command``) are pure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from cdc_relay import state
from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.pg.catalog import slot_info


@dataclass(frozen=True, slots=True)
class SlotHold:
    """What dropping the slot would lose, as read just before."""

    slot: str
    exists: bool
    active_pid: int | None  # a walsender (a relay) streams from it
    unconfirmed_bytes: int | None  # WAL after the slot's confirmed position
    # Outbox rows and emitted messages in that WAL (None: could not be counted).
    unconfirmed_changes: int | None
    confirmed_commit_at: datetime | None  # the relay's newest confirmed commit, if recorded


def refusal(hold: SlotHold, *, force: bool) -> str | None:
    """Why ``drop`` must not go ahead (None: nothing would be lost, or ``--force``).

    An attached relay and held changes both refuse; ``--force`` overrides both
    (``detach`` then ends the relay's connection, since Postgres cannot drop a
    slot in use).
    """
    if not hold.exists:
        return None
    if hold.active_pid is not None and not force:
        return (
            f"replication slot {hold.slot} is in use by a relay (walsender pid "
            f"{hold.active_pid}); stop the relay first, or add --force to end its connection "
            "and drop the slot (that relay then stops: its slot is gone)"
        )
    if force or not hold.unconfirmed_bytes or hold.unconfirmed_changes == 0:
        return None
    if hold.unconfirmed_changes is None:
        held = (
            f"{hold.unconfirmed_bytes:,} bytes of WAL the relay has not confirmed "
            "(could not count the outbox rows in them)"
        )
    else:
        held = (
            f"{hold.unconfirmed_changes} outbox row(s) or emitted message(s) the relay has not "
            f"published and confirmed ({hold.unconfirmed_bytes:,} bytes of WAL)"
        )
    since = (
        f", committed after {state.format_since(hold.confirmed_commit_at)}"
        if hold.confirmed_commit_at is not None
        else ""
    )
    return (
        f"refusing to drop replication slot {hold.slot}: it holds {held}{since}, which would "
        "never be published; run the relay until it catches up, or drop with --force and "
        "republish them with `cdc-relay resync`"
    )


def resync_command(hold: SlotHold, settings: Settings) -> str:
    """The command that republishes what the dropped slot still held (rows, not messages)."""
    slot = state.slot_option(settings)
    if hold.confirmed_commit_at is None:
        return f"cdc-relay resync{slot} --since TIMESTAMP (when the relay last delivered)"
    since = state.format_since(hold.confirmed_commit_at - state.DEFAULT_MARGIN)
    return f"cdc-relay resync{slot} --since {since}"


DETACH_WAIT: Final = 10.0
"""Seconds ``detach`` waits for the slot to be released after ending its walsender."""


def detach(conn: psycopg.Connection[Any], slot: str, *, wait: float = DETACH_WAIT) -> None:
    """End whatever walsender holds ``slot`` and wait until the slot is free (``--force``).

    A relay reconnects after a moment: each pid found holding the slot is ended
    again until it is free or ``wait`` runs out, which is one ConfigError line.
    """
    deadline = time.monotonic() + wait
    while True:
        info = slot_info(conn, slot)
        if info is None or not info.active:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"replication slot {slot} is still in use by pid {info.active_pid} after "
                f"{wait:g}s of ending its connection; stop the relay and run drop again"
            )
        if info.active_pid is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (info.active_pid,))
        time.sleep(0.1)


def read_hold(conn: psycopg.Connection[Any], settings: Settings) -> SlotHold:
    """Read what the slot holds, without consuming it (a peek, bounded by the statement timeout)."""
    info = slot_info(conn, settings.slot)
    recorded = _recorded_commit(conn, settings)
    if info is None:
        return SlotHold(settings.slot, False, None, None, None, recorded)
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (settings.slot,),
    ).fetchone()
    unconfirmed = row[0] if row is not None else None
    changes = None
    if not info.active and unconfirmed:
        changes = _count_changes(conn, settings)
    active_pid = info.active_pid if info.active else None
    return SlotHold(settings.slot, True, active_pid, unconfirmed, changes, recorded)


def _count_changes(conn: psycopg.Connection[Any], settings: Settings) -> int | None:
    """Inserts into the published tables and logical messages the slot would still send.

    pgoutput decodes the slot's WAL for the publication without advancing it
    (``peek``); Begin, Commit and Relation messages are not changes.
    """
    try:
        row = conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes("
            "%s, NULL, NULL, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
            " WHERE get_byte(data, 0) IN (73, 77)",  # 'I'nsert, 'M'essage
            (settings.slot, settings.publication),
        ).fetchone()
    except psycopg.Error:
        # Taken meanwhile, no publication, too much to decode within the statement
        # timeout: unknown, which refuses like rows would.
        return None
    return int(row[0]) if row is not None else None


def _recorded_commit(conn: psycopg.Connection[Any], settings: Settings) -> datetime | None:
    try:
        recorded = state.read(conn, state.table_name(settings), settings.slot)
    except psycopg.Error:
        return None
    return recorded.confirmed_commit_at if recorded is not None else None

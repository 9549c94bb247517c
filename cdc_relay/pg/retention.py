"""Outbox retention: ``prune`` once from the CLI, and each pass of ``run --retention``.

The loop that runs those passes beside the stream is ``loops.retain_outbox``.

Safe for delivery: the relay reads inserts from the WAL, not the table, and
the publication publishes inserts only, so these deletes never reach it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from cdc_relay.config import Settings
from cdc_relay.layout import build_layout
from cdc_relay.pg.catalog import connect
from cdc_relay.schema import qualified


def _prune_query(settings: Settings) -> sql.Composed:
    """One batch of old rows (parameters: the age, the batch size); short locks, no scan.

    The id and creation-time columns are the layout's (``--layout``, ``--column``).
    """
    layout = build_layout(settings.layout, settings.column, settings.header_column)
    return sql.SQL(
        "DELETE FROM {t} WHERE {id} IN (SELECT {id} FROM {t} WHERE {at} < now() - %s LIMIT %s)"
    ).format(
        t=qualified(*settings.table_parts),
        id=sql.Identifier(layout.column_of("id") or "id"),
        at=sql.Identifier(layout.column_of("created_at") or "created_at"),
    )


def prune_outbox(
    conn: psycopg.Connection[Any],
    settings: Settings,
    older_than: timedelta,
    *,
    batch: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete outbox rows older than the retention, ``batch`` rows per transaction.

    Safe for delivery: the relay reads inserts from the WAL, not the table, and
    the publication publishes inserts only, so these deletes never reach it.
    Small autocommit batches keep locks short and never pin the xmin horizon.
    """
    query = _prune_query(settings)
    total = 0
    while True:
        deleted = conn.execute(query, (older_than, batch)).rowcount
        total += deleted
        if deleted < batch:
            return total
        if progress is not None:
            progress(total)


def retention_pass(
    settings: Settings, older_than: timedelta, batch: int, pause: float, stop: asyncio.Event
) -> int:
    """One pass of ``run --retention`` (``loops.retain_outbox``): its own short connection.

    ``batch`` rows per transaction and ``pause`` seconds between batches, until
    fewer than ``batch`` were old enough or ``stop`` was set.
    """
    query = _prune_query(settings)
    total = 0
    with connect(settings.dsn, application_name="cdc-relay retention") as conn:
        conn.execute("SET statement_timeout = '30s'; SET lock_timeout = '2s'")
        while not stop.is_set():
            deleted = conn.execute(query, (older_than, batch)).rowcount
            total += deleted
            if deleted < batch:
                break
            time.sleep(pause)
    return total

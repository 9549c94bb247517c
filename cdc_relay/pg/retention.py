"""Outbox retention: ``prune`` once from the CLI, or ``run --retention`` beside the stream.

Safe for delivery: the relay reads inserts from the WAL, not the table, and
the publication publishes inserts only, so these deletes never reach it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay.config import Settings
from cdc_relay.deadline import event_within
from cdc_relay.errors import ConfigError
from cdc_relay.pg.catalog import connect
from cdc_relay.redact import one_line
from cdc_relay.schema import qualified

log = logging.getLogger("cdc_relay")


def _prune_query(table: tuple[str, str]) -> sql.Composed:
    """One batch of old rows (parameters: the age, the batch size); short locks, no scan."""
    return sql.SQL(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE created_at < now() - %s LIMIT %s)"
    ).format(t=qualified(*table))


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
    query = _prune_query(settings.table_parts)
    total = 0
    while True:
        deleted = conn.execute(query, (older_than, batch)).rowcount
        total += deleted
        if deleted < batch:
            return total
        if progress is not None:
            progress(total)


RETENTION_INTERVAL: Final = 60.0  # seconds between background retention passes


RETENTION_BATCH: Final = 500  # rows per DELETE in the background


RETENTION_PAUSE: Final = 0.05  # seconds between batches: a low rate, never a lock storm


async def retain_outbox(
    settings: Settings,
    older_than: timedelta,
    stop: asyncio.Event,
    *,
    interval: float = RETENTION_INTERVAL,
    batch: int = RETENTION_BATCH,
    pause: float = RETENTION_PAUSE,
    on_pass: Callable[[int], None] | None = None,
) -> None:
    """``run --retention``: every ``interval`` seconds, prune rows older than ``older_than``.

    Runs beside the stream until ``stop`` is set. Each pass uses its own short
    connection and deletes ``batch`` rows per transaction with a pause between
    batches, so it never holds many locks or competes with the application. A
    failed pass is logged and retried at the next one: retention must never end
    the relay. Safe for delivery like ``prune`` (deletes are not published);
    ``on_pass`` gets the number of rows each pass deleted.
    """
    while not stop.is_set():
        try:
            deleted = await asyncio.to_thread(
                _retention_pass, settings, older_than, batch, pause, stop
            )
        except (psycopg.Error, ConfigError, OSError) as exc:
            log.warning(
                "retention pass failed (retrying in %.0fs): %s", interval, one_line(str(exc))
            )
        else:
            if deleted:
                log.info("retention: deleted %d outbox row(s) older than %s", deleted, older_than)
            if on_pass is not None:
                on_pass(deleted)
        await event_within(stop, interval)


def _retention_pass(
    settings: Settings, older_than: timedelta, batch: int, pause: float, stop: asyncio.Event
) -> int:
    query = _prune_query(settings.table_parts)
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

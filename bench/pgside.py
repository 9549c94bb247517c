"""Postgres side: outbox setups, backlogs, WAL positions and the decoding ceiling."""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.loadproc import PAD
from cdc_relay.config import Settings
from cdc_relay.lsn import format_lsn
from cdc_relay.pg import setup
from devtools.servers import PostgresServer

# One statement per transaction: the procedure COMMITs after each batch of rows,
# so a backlog of N single-row transactions is written server-side in seconds.
FILL_PROCEDURE = """
CREATE OR REPLACE PROCEDURE bench_fill(tbl regclass, n int, per_txn int, pad text)
LANGUAGE plpgsql AS $$
DECLARE
    i int := 0;
    stmt text := format(
        'INSERT INTO %s (aggregate_type, aggregate_id, event_type, payload)'
        ' SELECT ''order'', g::text, ''OrderCreated'','
        ' jsonb_build_object(''order_id'', 1000000 + g, ''pad'', $1)'
        ' FROM generate_series($2, $3) g', tbl);
BEGIN
    WHILE i < n LOOP
        EXECUTE stmt USING pad, i + 1, least(i + per_txn, n);
        COMMIT;
        i := i + per_txn;
    END LOOP;
END $$
"""

# The last commit's end LSN is read as the insert position right after it; a
# page header (<= 40 bytes) or a stray small record (running-xacts, about 50
# bytes) may sit in between. Any earlier commit ends far more than this before
# it (a 300-byte row alone is a ~350-byte WAL record).
LSN_SLACK = 256


def lsn_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def new_settings(dsn: str, amqp_url: str, tag: str) -> Settings:
    """Names no other step uses: slot, publication, table, exchange."""
    name = f"{tag}_{uuid.uuid4().hex[:6]}"
    return Settings(
        dsn=dsn,
        amqp_urls=[amqp_url],
        slot=f"bench_{name}",
        publication=f"bench_pub_{name}",
        table=f"public.bench_{name}",
        exchange=f"bench_ex_{name}",
    )


def init_outbox(settings: Settings, autovacuum: bool = False) -> None:
    """Table, dead-letter table, publication and slot, as ``cdc-relay init`` makes them.

    Autovacuum is off for measured tables so that no vacuum WAL lands between
    the backlog and the position the drain waits for.
    """
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        setup.init(conn, settings)
        if not autovacuum:
            conn.execute(f"ALTER TABLE {settings.table} SET (autovacuum_enabled = false)")


def drop_slots(dsn: str, *slots: str) -> None:
    """Drop replication slots, waiting (up to 10 s each) for their walsender to let go."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in slots:
            for _ in range(100):
                row = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                if row is None:
                    break
                if not row[0]:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    break
                time.sleep(0.1)


def drop_outbox(settings: Settings, extra_slots: tuple[str, ...] = ()) -> None:
    """Drop the slots (waiting for them to be released), publication and tables."""
    drop_slots(settings.dsn, settings.slot, *extra_slots)
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(f"DROP PUBLICATION IF EXISTS {settings.publication}")
        conn.execute(f"DROP TABLE IF EXISTS {settings.table}")
        conn.execute(f"DROP TABLE IF EXISTS {settings.table}_dead_letter")
        conn.execute("CHECKPOINT")


@dataclass
class Backlog:
    """An outbox with ``rows`` committed rows that its slot (and a second one) have not read."""

    settings: Settings
    rows: int
    txn_size: int
    end_lsn: int = 0
    fill_seconds: float = 0.0
    ceiling_slot: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def drop(self) -> None:
        drop_outbox(self.settings, (self.ceiling_slot,) if self.ceiling_slot else ())


def fill(dsn: str, table: str, rows: int, txn_size: int) -> tuple[int, float]:
    """Insert ``rows`` 300-byte outbox rows in ``txn_size``-row transactions.

    Returns the end LSN of the last commit (see LSN_SLACK) and the seconds taken.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FILL_PROCEDURE)
        started = time.monotonic()
        conn.execute("CALL bench_fill(%s::regclass, %s, %s, %s)", (table, rows, txn_size, PAD))
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        seconds = time.monotonic() - started
    assert row is not None
    return lsn_int(row[0]), seconds


def make_backlog(settings: Settings, rows: int, txn_size: int) -> Backlog:
    """A fresh outbox, its slot plus a ceiling slot (both made first), then the rows."""
    init_outbox(settings)
    backlog = Backlog(settings, rows, txn_size, ceiling_slot=settings.slot + "_pg")
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (backlog.ceiling_slot,)
        )
    backlog.end_lsn, backlog.fill_seconds = fill(settings.dsn, settings.table, rows, txn_size)
    return backlog


def pg_ceiling(pg: PostgresServer, backlog: Backlog) -> dict[str, float]:
    """pg_recvlogical (pgoutput, proto 1) decodes the backlog to /dev/null; rows/s."""
    settings = backlog.settings
    args = [
        str(pg.bindir / "pg_recvlogical"),
        "-d",
        settings.dsn,
        "--slot",
        backlog.ceiling_slot,
        "--start",
        "-P",
        "pgoutput",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={settings.publication}",
        "--endpos",
        format_lsn(backlog.end_lsn),
        "--no-loop",
        "-f",
        "/dev/null",
    ]
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({done.returncode}): {done.stderr.strip()}")
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (backlog.ceiling_slot,),
        ).fetchone()
    confirmed = int(row[0]) if row else 0
    if confirmed < backlog.end_lsn - LSN_SLACK:
        raise RuntimeError(
            f"pg_recvlogical stopped at {format_lsn(confirmed)}, "
            f"before the backlog's end {format_lsn(backlog.end_lsn)}"
        )
    return {"rows": backlog.rows, "seconds": seconds, "rows_per_s": backlog.rows / seconds}


class SlotWatch:
    """A kept-open connection that reads a slot's confirmed_flush_lsn cheaply."""

    def __init__(self, dsn: str, slot: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.slot = slot

    def confirmed(self) -> int:
        row = self.conn.execute(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def active_pid(self) -> int | None:
        """The pid of the walsender that holds the slot (None while no one streams it)."""
        row = self.conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def close(self) -> None:
        self.conn.close()


def dead_letter_count(settings: Settings) -> int:
    """Rows in the outbox's dead-letter table."""
    schema, table = settings.dead_letter_table
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()
    return int(row[0]) if row else 0


def server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return lsn_int(row[0])

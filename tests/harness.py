"""Shared helpers for integration tests: an initialised outbox per test, unique names.

The relay process, the consumer and the metrics scraper live in ``devtools``
(shared with the benchmark and the demo); they are re-exported here so tests
import every helper from one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from cdc_relay.config import Settings
from cdc_relay.pg import catalog
from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import emit_key_table
from devtools.consumer import Consumer, Delivery
from devtools.metrics import metrics_text, parse_histogram
from devtools.relayproc import RelayProcess, cli_args

__all__ = [
    "Consumer",
    "Delivery",
    "RelayProcess",
    "Setup",
    "metrics_text",
    "parse_histogram",
    "run_cli",
    "unique_names",
    "wait_until",
]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``cdc-relay ARGS`` as a child process, with no CDC_RELAY_* variable but ``env``'s."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_RELAY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cdc_relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def unique_names(prefix: str = "t") -> dict[str, str]:
    """Slot, publication, table and exchange names no other test uses."""
    tag = f"{prefix}_{uuid.uuid4().hex[:8]}"
    return {
        "slot": f"slot_{tag}",
        "publication": f"pub_{tag}",
        "table": f"public.outbox_{tag}",
        "exchange": f"ex_{tag}",
    }


@dataclass
class Setup:
    """An initialised outbox (table, publication, slot, exchange) for one test."""

    dsn: str
    amqp_url: str
    names: dict[str, str]
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = Settings(dsn=self.dsn, amqp_urls=[self.amqp_url], **self.names)

    @property
    def table(self) -> str:
        return self.names["table"]

    def init(self, **options: Any) -> list[str]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return pg_setup.init(conn, self.settings, **options)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception), psycopg.connect(self.dsn, autocommit=True) as conn:
            for _ in range(50):
                info = catalog.slot_info(conn, self.names["slot"])
                if info is None or not info.active:
                    break
                time.sleep(0.1)
            pg_setup.drop(conn, self.settings, publication=True)
            conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            conn.execute(f"DROP TABLE IF EXISTS {self.table}_dead_letter")
            conn.execute(f"DROP TABLE IF EXISTS {self.table}_relay_state")
            keys = emit_key_table(self.settings.table_parts)
            conn.execute(f'DROP TABLE IF EXISTS "{keys[0]}"."{keys[1]}"')

    def cli_args(self, command: str = "run") -> list[str]:
        """The naming options ``command`` takes (e.g. "dead-letters list")."""
        return cli_args(self.settings, command)

    def insert(self, conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[str]:
        """Insert rows in the caller's transaction; returns their ids."""
        ids = []
        with conn.cursor() as cur:
            for row in rows:
                cur.execute(
                    f"INSERT INTO {self.table} (aggregate_type, aggregate_id, event_type, payload,"
                    " headers, exchange, routing_key) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING id::text",
                    (
                        row.get("aggregate_type", "order"),
                        str(row.get("aggregate_id", "1")),
                        row.get("event_type", "Created"),
                        orjson.dumps(row.get("payload", {})).decode(),
                        orjson.dumps(row.get("headers", {})).decode(),
                        row.get("exchange"),
                        row.get("routing_key"),
                    ),
                )
                fetched = cur.fetchone()
                assert fetched is not None
                ids.append(fetched[0])
        return ids

    def confirmed_lag(self) -> int:
        """Bytes between the current WAL position and the slot's confirmed_flush_lsn."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.names["slot"],),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def confirmed_flush(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.names["slot"],),
            ).fetchone()
        assert row is not None
        return int(row[0])


async def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())

"""A slot invalidated by max_slot_wal_keep_size, then ``resync``: no gap, failover flag kept.

Own PostgreSQL 17 server (module scope): the test lowers max_slot_wal_keep_size
and fills WAL, which must not touch other tests' slots; 17 has failover slots.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from cdc_relay.errors import EX_CONFIG, ConfigError
from cdc_relay.pg import checks
from devtools.servers import PostgresServer, RabbitServer
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, unique_names

pytestmark = [pytest.mark.asyncio, pytest.mark.fault]


@pytest.fixture(scope="module")
def pg17(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory(version=17)


@pytest.fixture(scope="module")
def rabbit(rabbit_factory: ServerFactory[RabbitServer]) -> RabbitServer:
    return rabbit_factory()


@pytest_asyncio.fixture
async def outbox(pg17: PostgresServer, rabbit: RabbitServer) -> AsyncIterator[Setup]:
    setup = Setup(pg17.dsn, rabbit.amqp_url, unique_names("rsf"))
    setup.init()
    yield setup
    setup.cleanup()


def insert(setup: Setup, n: int, tag: str) -> list[str]:
    with psycopg.connect(setup.dsn) as conn:
        ids = setup.insert(conn, [{"aggregate_id": f"{tag}{i}"} for i in range(n)])
        conn.commit()
    return ids


def invalidate_slot(dsn: str, slot: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE TABLE IF NOT EXISTS wal_filler (data text)")
        try:
            for _ in range(6):
                conn.execute(
                    "INSERT INTO wal_filler SELECT repeat('x', 1000) FROM generate_series(1, 5000)"
                )
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
            row = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            assert row is not None and row[0] == "lost", row
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("DROP TABLE IF EXISTS wal_filler")


async def test_invalidated_failover_slot_resync_keeps_failover_and_loses_nothing(
    outbox: Setup, tmp_path: Path
) -> None:
    slot = outbox.names["slot"]
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, false, true)",
            (slot,),
        )
    consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
    try:
        since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
        relay = RelayProcess(outbox, tmp_path / "relay1.log").start()
        await relay.wait_for_log_async("streaming from slot")
        delivered = insert(outbox, 20, "a")
        await consumer.wait_for(set(delivered))
        assert relay.stop() == 0
        missed = insert(outbox, 30, "b")
        invalidate_slot(outbox.dsn, slot)

        relay = RelayProcess(outbox, tmp_path / "relay2.log").start()
        assert relay.proc is not None
        assert await asyncio.to_thread(relay.proc.wait, 60) == EX_CONFIG
        with (
            psycopg.connect(outbox.dsn, autocommit=True) as conn,
            pytest.raises(
                ConfigError, match=r"invalidated .* `cdc-relay resync --slot \S+ --since \S+`"
            ),
        ):
            checks.validate(conn, outbox.settings)

        cmd = [sys.executable, "-m", "cdc_relay.cli", "resync", *outbox.cli_args()]
        done = await asyncio.to_thread(
            subprocess.run, [*cmd, "--since", since], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "lost (wal_status=lost): drop it, create it again (failover)" in done.stdout
        assert "resync done: 50 row(s)" in done.stdout, done.stdout
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT failover, wal_status FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
        assert row == (True, "reserved")

        relay = RelayProcess(outbox, tmp_path / "relay3.log").start()
        try:
            await relay.wait_for_log_async("streaming from slot")
            later = insert(outbox, 10, "c")
            await consumer.wait_for(set(delivered + missed + later))
        finally:
            relay.stop_quietly()
    finally:
        await consumer.close()

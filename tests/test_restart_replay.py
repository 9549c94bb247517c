"""A Postgres restart replays at most the window, also on 15 and 16 with an open transaction.

Before PostgreSQL 17 a logical slot's confirmed position reaches disk at
shutdown only if its restart_lsn moved, which an open transaction (on any
table) prevents: the server resumes at an old position. The relay starts
from what it knows was confirmed instead. Real servers, a real fast restart.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdc_relay import state
from cdc_relay.lsn import Lsn
from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, unique_names, wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.fault]

WINDOW = 50  # --max-in-flight: what a restart may send again
ROWS = 2000  # in 40 transactions, all confirmed before the restart


@pytest.fixture(params=[None, 16], ids=["pg15", "pg16"])
def restartable_pg(
    request: pytest.FixtureRequest, pg_factory: ServerFactory[PostgresServer]
) -> Iterator[PostgresServer]:
    with pg_factory.running(version=request.param) as pg:
        yield pg


@pytest.mark.timeout(180)
async def test_fast_restart_with_an_open_transaction_replays_at_most_the_window(
    restartable_pg: PostgresServer, amqp_url: str, tmp_path: Path
) -> None:
    setup = Setup(restartable_pg.dsn, amqp_url, unique_names("rr"))
    setup.init()
    consumer = await Consumer(amqp_url, setup.names["exchange"]).start()
    relay = RelayProcess(setup, tmp_path / "relay.log", "--max-in-flight", str(WINDOW)).start()
    pinning = psycopg.connect(setup.dsn)
    try:
        await relay.wait_for_log_async("streaming from slot")
        # Idle in transaction with an xid: the slot's restart_lsn cannot move past it.
        pinning.execute("CREATE TEMP TABLE pin (x int)")
        pinning.execute("SELECT txid_current()")
        ids: list[str] = []
        with psycopg.connect(setup.dsn) as conn:
            for batch in range(ROWS // 50):
                ids += setup.insert(conn, [{"aggregate_id": f"{batch}-{i}"} for i in range(50)])
                conn.commit()
        await consumer.wait_for(set(ids), timeout=60)
        with psycopg.connect(setup.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        end = int(row[0].split("/")[0], 16) << 32 | int(row[0].split("/")[1], 16)
        # The relay told the server (status updates) that everything was confirmed.
        assert await wait_until(lambda: setup.confirmed_flush() >= end - 4096, 30)
        before = len(consumer.ids())

        await asyncio.to_thread(restartable_pg.restart, "fast")
        assert await wait_until(lambda: relay.log().count("streaming from slot") == 2, 60), (
            relay.log_tail()
        )
        with psycopg.connect(setup.dsn) as conn:
            later = setup.insert(conn, [{"aggregate_id": f"late-{i}"} for i in range(10)])
            conn.commit()
        await consumer.wait_for(set(later), timeout=60)
        replayed = Counter(consumer.ids()[before:])
        duplicates = sum(n for i, n in replayed.items() if i in set(ids))
        print(f"{restartable_pg.version or 15}: {duplicates} of {ROWS} rows sent again")
        assert duplicates <= WINDOW, f"{duplicates} rows replayed after a restart"

        # The relay process dies too: the next one starts from the state row.
        pinning.close()  # ended by the restart
        pinning = psycopg.connect(setup.dsn)
        pinning.execute("SELECT txid_current()")
        more: list[str] = []
        with psycopg.connect(setup.dsn) as conn:
            for batch in range(ROWS // 50):
                more += setup.insert(conn, [{"aggregate_id": f"m{batch}-{i}"} for i in range(50)])
                conn.commit()
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
            last_commit = Lsn.parse(row[0])
        await consumer.wait_for(set(more), timeout=60)
        table = state.table_name(setup.settings)

        def recorded_all() -> bool:
            with psycopg.connect(setup.dsn, autocommit=True) as conn:
                row = state.read(conn, table, setup.names["slot"])
            return (
                row is not None
                and row.confirmed_lsn is not None
                and Lsn.parse(row.confirmed_lsn) >= last_commit - 4096  # others write WAL too
            )

        assert await wait_until(recorded_all, 30)
        relay.kill()
        before = len(consumer.ids())
        await asyncio.to_thread(restartable_pg.restart, "fast")
        relay = RelayProcess(setup, tmp_path / "relay2.log", "--max-in-flight", str(WINDOW))
        relay.start()
        await relay.wait_for_log_async("streaming from slot", 60)
        with psycopg.connect(setup.dsn) as conn:
            last = setup.insert(conn, [{"aggregate_id": f"last-{i}"} for i in range(10)])
            conn.commit()
        await consumer.wait_for(set(last), timeout=60)
        replayed = Counter(consumer.ids()[before:])
        duplicates = sum(n for i, n in replayed.items() if i in set(ids + more))
        print(f"{restartable_pg.version or 15}, new process: {duplicates} rows sent again")
        assert duplicates <= WINDOW, f"{duplicates} rows replayed after a relay+server restart"
    finally:
        relay.stop_quietly()
        pinning.close()
        await consumer.close()
        setup.cleanup()

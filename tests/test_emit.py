"""The table-less outbox end to end: ``init --no-table``, ``outbox_emit``, a real relay process.

Emitted messages must get the table's guarantees: nothing before commit, nothing
from a rolled-back transaction, statement order with table inserts of the same
transaction, and an idle outbox must not pin WAL while other tables change.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import pytest_asyncio

from cdc_relay.errors import ConfigError
from cdc_relay.pg import checks
from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import function_names
from tests.harness import Consumer, RelayProcess, Setup, unique_names, wait_until


def emit_name(setup: Setup) -> str:
    schema, _ = setup.settings.table_parts
    return f"{schema}.{function_names(setup.settings.table_parts)[1]}"


def drop_functions(setup: Setup) -> None:
    schema, _ = setup.settings.table_parts
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        for name in function_names(setup.settings.table_parts):
            conn.execute(f"DROP FUNCTION IF EXISTS {schema}.{name}")


def emit(cur: psycopg.Cursor[Any], setup: Setup, aggregate_id: str, payload: Any) -> str:
    row = cur.execute(
        f"SELECT {emit_name(setup)}('order', %s, 'Emitted', %s::jsonb)::text",
        (aggregate_id, orjson.dumps(payload).decode()),
    ).fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture
def tableless(pg_dsn: str, amqp_url: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, amqp_url, unique_names("emt"))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg_setup.init(conn, setup.settings, create_table=False)
    yield setup
    setup.cleanup()
    drop_functions(setup)


@pytest.fixture
def outbox(pg_dsn: str, amqp_url: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, amqp_url, unique_names("emx"))
    setup.init(emit=True)
    yield setup
    setup.cleanup()
    drop_functions(setup)


async def consumer_for(setup: Setup) -> Consumer:
    return await Consumer(setup.amqp_url, setup.names["exchange"]).start()


@pytest_asyncio.fixture
async def relay(tableless: Setup, tmp_path: Path) -> AsyncIterator[RelayProcess]:
    proc = RelayProcess(tableless, tmp_path / "relay.log").start()
    await proc.wait_for_log_async("streaming from slot")
    yield proc
    proc.stop_quietly()


def test_init_no_table_is_a_valid_tableless_setup(tableless: Setup) -> None:
    with psycopg.connect(tableless.dsn, autocommit=True) as conn:
        facts = checks.validate(conn, tableless.settings)
        assert facts.outbox_relid == 0
        pub = tableless.names["publication"]
        tables = conn.execute(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s", (pub,)
        ).fetchone()
        assert tables == (0,)
        enqueue, emit_fn = function_names(tableless.settings.table_parts)
        present = {
            r[0]
            for r in conn.execute(
                "SELECT proname FROM pg_proc WHERE proname = ANY(%s)", ([enqueue, emit_fn],)
            ).fetchall()
        }
        assert present == {emit_fn}  # no table for the enqueue function to insert into
        again = pg_setup.init(conn, tableless.settings, create_table=False)
    assert all("already exist" in line or "none (table-less" in line for line in again), again


def test_a_publication_covering_another_table_is_a_missing_outbox(tableless: Setup) -> None:
    pub = tableless.names["publication"]
    with psycopg.connect(tableless.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {tableless.table}_other (id int)")
        try:
            conn.execute(f"ALTER PUBLICATION {pub} ADD TABLE {tableless.table}_other")
            with pytest.raises(ConfigError, match=r"outbox table \S+ does not exist"):
                checks.validate(conn, tableless.settings)
        finally:
            conn.execute(f"DROP TABLE {tableless.table}_other")


def test_no_publication_and_no_table_names_init_no_table(pg_dsn: str) -> None:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("emn"))
    with (
        psycopg.connect(pg_dsn, autocommit=True) as conn,
        pytest.raises(ConfigError, match="init --no-table"),
    ):
        checks.validate(conn, setup.settings)


@pytest.mark.asyncio
async def test_emit_commit_and_rollback(tableless: Setup, relay: RelayProcess) -> None:
    consumer = await consumer_for(tableless)
    try:
        with psycopg.connect(tableless.dsn) as conn, conn.cursor() as cur:
            committed = [emit(cur, tableless, str(i), {"i": i}) for i in range(3)]
            conn.commit()
            rolled_back = [emit(cur, tableless, "r", {"r": i}) for i in range(2)]
            conn.rollback()
            after = [emit(cur, tableless, "z", {"z": 1})]
            conn.commit()
        await consumer.wait_for(set(committed + after))
        await consumer.settle(1.0)
        ids = consumer.ids()
        assert ids == committed + after
        assert not set(rolled_back) & set(ids)
        first = consumer.deliveries[0]
        assert orjson.loads(first.body) == {"i": 0}
        assert first.headers["aggregate_id"] == "0" and first.properties["type"] == "Emitted"
        assert first.properties["timestamp"] is not None
    finally:
        await consumer.close()


@pytest.mark.asyncio
async def test_emit_and_table_inserts_in_one_transaction_keep_statement_order(
    outbox: Setup, tmp_path: Path
) -> None:
    consumer = await consumer_for(outbox)
    relay = RelayProcess(outbox, tmp_path / "relay.log").start()
    try:
        await relay.wait_for_log_async("streaming from slot")
        expected: list[str] = []
        with psycopg.connect(outbox.dsn) as conn, conn.cursor() as cur:
            for txn in range(3):
                for i in range(4):
                    if i % 2 == 0:
                        expected += outbox.insert(conn, [{"aggregate_id": f"t{txn}{i}"}])
                    else:
                        expected.append(emit(cur, outbox, f"e{txn}{i}", {"e": i}))
                conn.commit()
            emit(cur, outbox, "gone", {})
            outbox.insert(conn, [{"aggregate_id": "gone"}])
            conn.rollback()
        await consumer.wait_for(set(expected))
        await consumer.settle(1.0)
        assert consumer.ids() == expected
        # An emitted message and a table row with the same payload give the same body.
        bodies = {d.message_id: d.body for d in consumer.deliveries}
        assert bodies[expected[1]] == b'{"e": 1}'
    finally:
        relay.stop_quietly()
        await consumer.close()


@pytest.mark.asyncio
async def test_idle_tableless_slot_advances_while_other_tables_change(
    tableless: Setup, relay: RelayProcess
) -> None:
    with psycopg.connect(tableless.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {tableless.table}_busy (data text)")
        try:
            start = tableless.confirmed_flush()
            for _ in range(5):
                conn.execute(
                    f"INSERT INTO {tableless.table}_busy"
                    " SELECT repeat('x', 200) FROM generate_series(1, 2000)"
                )
            row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
            assert row is not None
            written = int(row[0])
            assert written - start > 1_000_000
            advanced = await wait_until(lambda: tableless.confirmed_flush() >= written, 30)
            assert advanced, (start, written, tableless.confirmed_flush())
            # and the slot keeps holding at most a little WAL
            assert await wait_until(lambda: tableless.confirmed_lag() < 100_000, 30)
        finally:
            conn.execute(f"DROP TABLE {tableless.table}_busy")


@pytest.mark.asyncio
async def test_two_outboxes_in_one_database_keep_their_emitted_messages_apart(
    pg_dsn: str, amqp_url: str, tmp_path: Path
) -> None:
    """Every slot decodes every logical message: the prefix init writes keeps them apart."""
    setups = [Setup(pg_dsn, amqp_url, unique_names(tag)) for tag in ("emta", "emtb")]
    relays: list[RelayProcess] = []
    consumers: list[Consumer] = []
    try:
        for setup in setups:
            setup.settings.message_prefix = f"cdc_relay_{setup.names['slot'][-8:]}"
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                pg_setup.init(conn, setup.settings, create_table=False)
            consumers.append(await consumer_for(setup))
            relay = RelayProcess(
                setup,
                tmp_path / f"{setup.names['slot']}.log",
                "--message-prefix",
                setup.settings.message_prefix,
            ).start()
            await relay.wait_for_log_async("streaming from slot")
            relays.append(relay)
        sent: list[list[str]] = [[], []]
        with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.cursor() as cur:
            for i in range(3):
                for n, setup in enumerate(setups):
                    sent[n].append(emit(cur, setup, f"{n}-{i}", {"outbox": n}))
        for n, consumer in enumerate(consumers):
            await consumer.wait_for(set(sent[n]), timeout=30)
        await asyncio.sleep(1)  # a message that crossed over would have arrived by now
        for n, consumer in enumerate(consumers):
            assert sorted(consumer.ids()) == sorted(sent[n]), (n, consumer.ids(), sent)
    finally:
        for consumer in consumers:
            await consumer.close()
        for relay in relays:
            relay.stop_quietly()
        for setup in setups:
            setup.cleanup()
            drop_functions(setup)


def test_a_relay_whose_prefix_the_emit_function_does_not_write_is_refused(
    tableless: Setup,
) -> None:
    settings = dataclasses.replace(tableless.settings, message_prefix="someone_else")
    with psycopg.connect(tableless.dsn, autocommit=True) as conn:
        with pytest.raises(ConfigError) as refused:
            checks.validate(conn, settings)
        assert "prefix 'cdc_relay' but --message-prefix is 'someone_else'" in str(refused.value)
        assert "--message-prefix cdc_relay" in str(refused.value)
        # A function of the user's own (no emit call init would write) is not second-guessed.
        conn.execute(f"DROP FUNCTION {emit_name(tableless)}")
        conn.execute(
            f"CREATE OR REPLACE FUNCTION {emit_name(tableless)}() RETURNS int"
            " LANGUAGE sql AS 'SELECT 1'"
        )
        checks.validate(conn, settings)
        conn.execute(f"DROP FUNCTION {emit_name(tableless)}()")

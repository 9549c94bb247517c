"""The relay state table against a real Postgres: upsert, never backwards, throttled writer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdc_relay import state
from cdc_relay.pg import setup as pg_setup
from tests.harness import Setup, unique_names


@pytest.fixture
def outbox(pg_dsn: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("st"))
    lines = setup.init()
    assert f"relay state table {setup.table}_relay_state: created" in lines
    yield setup
    setup.cleanup()


@pytest.mark.asyncio
async def test_record_upserts_and_never_moves_backwards(outbox: Setup) -> None:
    table, slot = state.table_name(outbox.settings), outbox.names["slot"]
    t1 = datetime(2026, 11, 28, 9, 0, 1, tzinfo=UTC)
    t2 = datetime(2026, 11, 28, 9, 0, 2, tzinfo=UTC)
    async with await psycopg.AsyncConnection.connect(outbox.dsn, autocommit=True) as conn:
        await state.record(conn, table, slot, t2.timestamp(), 0x2000)
        await state.record(conn, table, slot, t1.timestamp(), 0x1000)  # an older relay's view
    with psycopg.connect(outbox.dsn, autocommit=True) as sync:
        got = state.read(sync, table, slot)
        assert got is not None
        assert (got.confirmed_commit_at, got.confirmed_lsn, got.resync_since) == (
            t2,
            "0/2000",
            None,
        )
        state.mark_resync(sync, table, slot, t1)
        marked = state.read(sync, table, slot)
        assert marked is not None and marked.resync_since == t1 and marked.confirmed_lsn == "0/2000"
        state.mark_resync(sync, table, slot, None)
        cleared = state.read(sync, table, slot)
        assert cleared is not None and cleared.resync_since is None
        assert state.read(sync, table, "other_slot") is None
        assert state.read(sync, ("public", "no_such_state_table"), slot) is None


@pytest.mark.asyncio
async def test_state_writer_throttles_and_survives_a_failed_write(outbox: Setup) -> None:
    table, slot = state.table_name(outbox.settings), outbox.names["slot"]
    writer = state.StateWriter(outbox.dsn, table, slot, interval=5.0)
    try:
        assert writer.due(100.0, 0x10)
        assert await writer.write(100.0, 1_800_000_000.0, 0x10)
        assert not writer.due(104.9, 0x20)  # too soon
        assert not writer.due(200.0, 0x10)  # nothing newer
        assert writer.due(105.0, 0x11)
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {outbox.table}_relay_state")
        assert not await writer.write(105.0, 1_800_000_001.0, 0x11)  # no exception
        assert writer.failures == 1
        assert writer.due(110.0, 0x11)  # tried again at the next due time
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            state.create(conn, table)
            # A lost connection is reopened at a later write, never raised.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'cdc-relay state'"
            )
        results = [await writer.write(110.0 + i, 1_800_000_002.0, 0x12) for i in range(2)]
        assert results[-1], (results, writer.failures)
        await writer.maybe_write(111.0, 1_800_000_003.0, 0x13)  # too soon: not written
        await writer.maybe_write(111.0, 1_800_000_004.0, 0x14, final=True)  # a clean stop
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            got = state.read(conn, table, slot)
        assert got is not None and got.confirmed_lsn == "0/14"
    finally:
        await writer.close()


@pytest.mark.asyncio
async def test_granted_role_can_record_its_position(outbox: Setup) -> None:
    role = f"relay_state_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
        try:
            lines = pg_setup.grant(conn, outbox.settings, role)
            assert any("_relay_state" in line for line in lines), lines
            dsn = make_conninfo(outbox.dsn, user=role)
            table = state.table_name(outbox.settings)
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as mine:
                await state.record(mine, table, outbox.names["slot"], 1_800_000_000.0, 0x30)
            got = state.read(conn, table, outbox.names["slot"])
            assert got is not None and got.confirmed_lsn == "0/30"
        finally:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.asyncio
async def test_maybe_write_needs_a_commit_time(outbox: Setup) -> None:
    table, slot = state.table_name(outbox.settings), outbox.names["slot"]
    writer = state.StateWriter(outbox.dsn, table, slot, interval=0.0)
    try:
        await writer.maybe_write(1.0, None, 0x40)  # only keepalives so far: nothing to record
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            assert state.read(conn, table, slot) is None
        await writer.maybe_write(2.0, 1_800_000_000.0, 0x40)
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            got = state.read(conn, table, slot)
        assert got is not None and got.confirmed_lsn == "0/40"
        assert got.confirmed_commit_at == datetime.fromtimestamp(1_800_000_000, UTC)
    finally:
        await writer.close()


@pytest.mark.asyncio
async def test_describe_lost_slot_names_the_command(outbox: Setup) -> None:
    table, slot = state.table_name(outbox.settings), outbox.names["slot"]
    generic = state.describe_lost_slot(outbox.settings)
    assert f"`cdc-relay resync --slot {slot} --since TIMESTAMP`" in generic
    at = datetime(2026, 11, 28, 9, 30, 15, 500_000, tzinfo=UTC)
    async with await psycopg.AsyncConnection.connect(outbox.dsn, autocommit=True) as conn:
        await state.record(conn, table, slot, at.timestamp(), 0x50)
    exact = state.describe_lost_slot(outbox.settings)
    assert "last confirmed a commit at 2026-11-28T09:30:15+00:00" in exact
    assert f"`cdc-relay resync --slot {slot} --since 2026-11-28T09:15:15+00:00`" in exact
    unreachable = Setup("postgresql://nobody@127.0.0.1:1/x", outbox.amqp_url, outbox.names)
    assert state.describe_lost_slot(unreachable.settings) == generic

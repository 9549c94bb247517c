"""create_slot_with_snapshot: the exported snapshot and the slot meet without gap or overlap.

What ``cdc-relay resync`` builds on: rows committed before the slot are read
from the snapshot, rows committed after it arrive through the slot.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from cdc_relay.lsn import Lsn
from cdc_relay.pg.pgoutput import Insert, decode_message
from cdc_relay.pg.replication import ReplicationError, ReplicationStream
from cdc_relay.pg.walproto import XLogData, decode_copy_data
from tests.test_replication_stream import Outbox, wait_slot

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest_asyncio.fixture
async def unslotted(pg_dsn: str) -> AsyncIterator[Outbox]:
    """A table and its publication; the test creates the slot."""
    name = f"snap_{uuid.uuid4().hex[:10]}"
    box = Outbox(pg_dsn, name, f"{name}_pub", f"{name}_slot")
    table, pub = sql.Identifier(box.table), sql.Identifier(box.publication)
    await box.execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text NOT NULL)").format(table),
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(pub, table),
    )
    try:
        yield box
    finally:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (box.slot,)
            )
            if await cur.fetchone():
                await wait_slot(pg_dsn, box.slot, active=False)
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (box.slot,))
            await conn.execute(sql.SQL("DROP PUBLICATION {}").format(pub))
            await conn.execute(sql.SQL("DROP TABLE {}").format(table))


async def insert_rows(box: Outbox, ids: range) -> None:
    insert = sql.SQL("INSERT INTO {} VALUES ({}, 'row')")
    table = sql.Identifier(box.table)
    for row_id in ids:  # one transaction each
        await box.execute(insert.format(table, row_id))


async def test_snapshot_sees_exactly_the_rows_before_the_slot(unslotted: Outbox) -> None:
    box = unslotted
    await insert_rows(box, range(1, 4))
    stream = await ReplicationStream.connect(box.dsn)
    try:
        consistent, snapshot = await stream.create_slot_with_snapshot(box.slot)
        assert snapshot
        await insert_rows(box, range(4, 7))  # committed after the slot

        # The snapshot, imported while the replication connection is idle.
        async with await psycopg.AsyncConnection.connect(box.dsn) as conn:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            async with conn.transaction():
                await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(snapshot))
                cur = await conn.execute(
                    sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(box.table))
                )
                assert [row[0] async for row in cur] == [1, 2, 3]

        async with await psycopg.AsyncConnection.connect(box.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT confirmed_flush_lsn::text, plugin FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (box.slot,),
            )
            row = await cur.fetchone()
        assert row is not None
        assert (Lsn.parse(row[0]), row[1]) == (consistent, "pgoutput")

        # The slot then streams exactly the rows after the snapshot.
        await stream.start(box.slot, box.publication, consistent)
        streamed: list[bytes | None] = []
        async with asyncio.timeout(20):
            while len(streamed) < 3:
                for raw in await stream.read_frames():
                    frame = decode_copy_data(raw)
                    if isinstance(frame, XLogData):
                        message = decode_message(frame.payload)
                        if isinstance(message, Insert):
                            streamed.append(message.new[0])  # type: ignore[arg-type]
        assert streamed == [b"4", b"5", b"6"]
    finally:
        await stream.close()


async def test_existing_slot_is_an_error_with_sqlstate(unslotted: Outbox) -> None:
    box = unslotted
    async with await psycopg.AsyncConnection.connect(box.dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (box.slot,))
    stream = await ReplicationStream.connect(box.dsn)
    try:
        with pytest.raises(ReplicationError) as caught:
            await stream.create_slot_with_snapshot(box.slot)
        assert caught.value.sqlstate == "42710"  # duplicate_object
        assert "already exists" in str(caught.value)
        # The connection is still usable after the refused command.
        assert await stream.show("wal_sender_timeout")
    finally:
        await stream.close()


async def test_show_unknown_setting_is_an_error(unslotted: Outbox) -> None:
    stream = await ReplicationStream.connect(unslotted.dsn)
    try:
        with pytest.raises(ReplicationError) as caught:
            await stream.show("no_such_setting")
        assert caught.value.sqlstate == "42704"
    finally:
        await stream.close()

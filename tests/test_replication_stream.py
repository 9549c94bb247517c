"""ReplicationStream against a real Postgres: start, frames, status, SHOW, slot in use.

Each test makes its own table, publication and slot with plain SQL (no
``admin`` code), so what is tested is only the replication connection.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from cdc_relay.pg.pgoutput import (
    Begin,
    Commit,
    Insert,
    LogicalMessage,
    PgOutputMessage,
    Relation,
    decode_message,
)
from cdc_relay.pg.replication import ReplicationError, ReplicationStream, SlotInUse
from cdc_relay.pg.walproto import PrimaryKeepalive, XLogData, decode_copy_data

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@dataclass
class Outbox:
    dsn: str
    table: str
    publication: str
    slot: str

    async def execute(self, *statements: sql.Composable | str) -> None:
        """Run statements in one transaction on a normal connection."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            for statement in statements:
                await conn.execute(statement)  # type: ignore[arg-type]


async def _slot_row(dsn: str, slot: str) -> tuple[bool, str | None] | None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (slot,),
        )
        return await cur.fetchone()


async def wait_slot(dsn: str, slot: str, *, active: bool, timeout: float = 10.0) -> str | None:
    """Wait until the slot is (in)active; return its confirmed_flush_lsn."""
    deadline = time.monotonic() + timeout
    while True:
        row = await _slot_row(dsn, slot)
        assert row is not None, f"slot {slot} is gone"
        if row[0] == active:
            return row[1]
        assert time.monotonic() < deadline, f"slot {slot} never became active={active}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def outbox(pg_dsn: str) -> AsyncIterator[Outbox]:
    name = f"repl_{uuid.uuid4().hex[:10]}"
    box = Outbox(pg_dsn, name, f"{name}_pub", f"{name}_slot")
    table, pub = sql.Identifier(box.table), sql.Identifier(box.publication)
    await box.execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text NOT NULL)").format(table),
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(pub, table),
    )
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (box.slot,))
    try:
        yield box
    finally:
        await wait_slot(pg_dsn, box.slot, active=False)
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (box.slot,))
            await conn.execute(sql.SQL("DROP PUBLICATION {}").format(pub))
            await conn.execute(sql.SQL("DROP TABLE {}").format(table))


async def read_transaction(
    stream: ReplicationStream, timeout: float = 20.0
) -> tuple[list[PgOutputMessage], list[XLogData]]:
    """Decoded messages up to and including the next Commit (keepalives skipped).

    Frames after that Commit in the same batch are dropped: one transaction at a time.
    """
    messages: list[PgOutputMessage] = []
    wrappers: list[XLogData] = []
    async with asyncio.timeout(timeout):
        while True:
            for raw in await stream.read_frames():
                frame = decode_copy_data(raw)
                if isinstance(frame, PrimaryKeepalive):
                    continue
                wrappers.append(frame)
                messages.append(decode_message(frame.payload))
                if isinstance(messages[-1], Commit):
                    return messages, wrappers


async def test_start_read_status_show_and_slot_in_use(outbox: Outbox) -> None:
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        async with await psycopg.AsyncConnection.connect(outbox.dsn) as conn:
            cur = await conn.execute("SHOW wal_sender_timeout")
            expected = await cur.fetchone()
        assert expected is not None
        assert await stream.show("wal_sender_timeout") == expected[0]

        await stream.start(outbox.slot, outbox.publication)
        await wait_slot(outbox.dsn, outbox.slot, active=True)
        table = sql.Identifier(outbox.table)
        insert = sql.SQL("INSERT INTO {} VALUES ({}, {})")
        await outbox.execute(
            insert.format(table, 1, "one"),
            insert.format(table, 2, "two"),
        )
        messages, wrappers = await read_transaction(stream)
        kinds = [type(m) for m in messages]
        assert kinds == [Begin, Relation, Insert, Insert, Commit]
        relation = messages[1]
        assert isinstance(relation, Relation) and relation.name == outbox.table
        assert [m.new for m in messages if isinstance(m, Insert)] == [
            (b"1", b"one"),
            (b"2", b"two"),
        ]
        commit = messages[-1]
        assert isinstance(commit, Commit)
        assert wrappers[-1].data_start == commit.end_lsn

        # The flush we send becomes the slot's confirmed position.
        end = commit.end_lsn
        await stream.send_status(end, end, end)
        deadline = time.monotonic() + 10
        expected_lsn = f"{end >> 32:X}/{end & 0xFFFFFFFF:X}"
        while (row := await _slot_row(outbox.dsn, outbox.slot)) and row[1] != expected_lsn:
            assert time.monotonic() < deadline, f"confirmed_flush_lsn stayed {row[1]}"
            await asyncio.sleep(0.05)

        # A second relay on the same slot is refused with 55006: the hot standby case.
        second = await ReplicationStream.connect(outbox.dsn)
        try:
            with pytest.raises(SlotInUse) as caught:
                await second.start(outbox.slot, outbox.publication)
            assert caught.value.sqlstate == "55006"
        finally:
            await second.close()
    finally:
        await stream.close()


async def test_waiting_for_data_while_idle(outbox: Outbox) -> None:
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        await stream.start(outbox.slot, outbox.publication)
        before = stream.last_receive
        reader = asyncio.ensure_future(read_transaction(stream))
        await asyncio.sleep(0.3)  # nothing to send: the reader waits on the socket
        assert stream.waiting_for_data
        await outbox.execute(
            sql.SQL("INSERT INTO {} VALUES (7, 'x')").format(sql.Identifier(outbox.table))
        )
        messages, _ = await reader
        assert isinstance(messages[-1], Commit)
        assert not stream.waiting_for_data
        assert stream.last_receive > before
    finally:
        await stream.close()


async def test_messages_option_delivers_logical_messages_in_the_transaction(
    outbox: Outbox,
) -> None:
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        await stream.start(outbox.slot, outbox.publication, messages=True)
        table = sql.Identifier(outbox.table)
        await outbox.execute(
            sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(table),
            "SELECT pg_logical_emit_message(true, 'cdc_relay', 'hello')",
            sql.SQL("INSERT INTO {} VALUES (2, 'b')").format(table),
        )
        messages, _ = await read_transaction(stream)
        kinds = [type(m) for m in messages]
        assert kinds == [Begin, Relation, Insert, LogicalMessage, Insert, Commit]
        message = messages[3]
        assert isinstance(message, LogicalMessage)
        assert (message.transactional, message.prefix, message.content) == (
            True,
            "cdc_relay",
            b"hello",
        )
    finally:
        await stream.close()


async def test_without_messages_option_no_logical_messages(outbox: Outbox) -> None:
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        await stream.start(outbox.slot, outbox.publication)
        await outbox.execute(
            "SELECT pg_logical_emit_message(true, 'cdc_relay', 'hello')",
            sql.SQL("INSERT INTO {} VALUES (1, 'a')").format(sql.Identifier(outbox.table)),
        )
        messages, _ = await read_transaction(stream)
        assert [type(m) for m in messages] == [Begin, Relation, Insert, Commit]
    finally:
        await stream.close()


async def test_unknown_slot_is_replication_error(outbox: Outbox) -> None:
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        with pytest.raises(ReplicationError) as caught:
            await stream.start(f"{outbox.slot}_missing", outbox.publication)
        assert caught.value.sqlstate == "42704"
        assert not isinstance(caught.value, SlotInUse)
    finally:
        await stream.close()


async def test_terminated_walsender_is_replication_error(outbox: Outbox) -> None:
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        await stream.start(outbox.slot, outbox.publication)
        await wait_slot(outbox.dsn, outbox.slot, active=True)
        reader = asyncio.ensure_future(read_transaction(stream))
        await asyncio.sleep(0.1)
        async with await psycopg.AsyncConnection.connect(outbox.dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (outbox.slot,),
            )
        with pytest.raises(ReplicationError) as caught:
            await reader
        # The server's FATAL arrives as the end of COPY, with its SQLSTATE (admin_shutdown).
        assert caught.value.sqlstate == "57P01"
    finally:
        await stream.close()


async def test_end_after_buffered_frames_keeps_its_sqlstate(outbox: Outbox) -> None:
    """Frames and the end in one read: frames first, then the server's error, not 'lost'.

    libpq leaves COPY mode when it meets the end; asking it for copy data again
    fails with 'no COPY in progress' and the SQLSTATE would be lost.
    """
    stream = await ReplicationStream.connect(outbox.dsn)
    try:
        await stream.start(outbox.slot, outbox.publication)
        await wait_slot(outbox.dsn, outbox.slot, active=True)
        async with await psycopg.AsyncConnection.connect(outbox.dsn, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (outbox.slot,),
            )
        await asyncio.sleep(0.5)  # the startup keepalives and the FATAL are all on the socket
        frames: list[bytes] = []
        with pytest.raises(ReplicationError) as caught:
            while True:
                frames += await stream.read_frames()
        assert caught.value.sqlstate == "57P01", caught.value
        assert all(isinstance(decode_copy_data(f), PrimaryKeepalive) for f in frames)
    finally:
        await stream.close()

"""Dead-letter storage: the relay's writer, the startup check, list and prune."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from cdc_relay import deadletters
from cdc_relay.deadletters import DeadLetter, DeadLetterWriter
from cdc_relay.errors import ConfigError
from tests.harness import Setup, unique_names


@pytest.fixture
def outbox(pg_dsn: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("dl"))
    setup.init()
    yield setup
    setup.cleanup()


def stored(setup: Setup) -> list[tuple[Any, ...]]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        return conn.execute(
            f"SELECT outbox_id, reason, row_data, lsn::text FROM {setup.table}_dead_letter"
            " ORDER BY id"
        ).fetchall()


@pytest.mark.asyncio
async def test_write_stores_any_id_in_one_statement(outbox: Setup) -> None:
    writer = await DeadLetterWriter.connect(outbox.dsn, outbox.settings.dead_letter_table)
    try:
        await writer.write(
            [
                DeadLetter("not-a-uuid", "unroutable", {"id": "not-a-uuid", "n": 1}, 0x1_0000_0010),
                DeadLetter(None, "cannot read outbox row", {"values": ["a\x00b"]}, 16),
                DeadLetter("42", "reason with NUL \x00", {}, 17),
            ]
        )
        await writer.write([])
    finally:
        await writer.close()
    assert stored(outbox) == [
        ("not-a-uuid", "unroutable", {"id": "not-a-uuid", "n": 1}, "1/10"),
        (None, "cannot read outbox row", {"values": ["a\ufffdb"]}, "0/10"),
        ("42", "reason with NUL \ufffd", {}, "0/11"),
    ]


@pytest.mark.asyncio
async def test_a_batch_larger_than_one_copy_chunk_is_stored_whole_and_in_order(
    outbox: Setup,
) -> None:
    """The COPY data goes out in chunks; a letter is never split or lost between two."""
    size = deadletters.COPY_CHUNK // 7  # chunks end mid-batch, at several places
    letters = [
        DeadLetter(str(n), f"reason {n}", {"payload": f"{n}:" + "x" * size}, 100 + n)
        for n in range(20)
    ]
    writer = await DeadLetterWriter.connect(outbox.dsn, outbox.settings.dead_letter_table)
    try:
        await writer.write(letters)
    finally:
        await writer.close()
    rows = stored(outbox)
    assert [(r[0], r[1], r[3]) for r in rows] == [
        (str(n), f"reason {n}", f"0/{100 + n:X}") for n in range(20)
    ]
    assert [r[2]["payload"] for r in rows] == [f"{n}:" + "x" * size for n in range(20)]


@pytest.mark.asyncio
async def test_write_fails_in_bounded_time_when_the_table_is_locked(outbox: Setup) -> None:
    writer = await DeadLetterWriter.connect(outbox.dsn, outbox.settings.dead_letter_table)
    with psycopg.connect(outbox.dsn) as locker:
        locker.execute(f"LOCK TABLE {outbox.table}_dead_letter IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.LockNotAvailable):
                await asyncio.wait_for(writer.write([DeadLetter("x", "r", {}, 1)]), 30)
        finally:
            await writer.close()
        elapsed = time.monotonic() - started
        locker.rollback()
    assert deadletters.LOCK_TIMEOUT - 0.5 < elapsed < deadletters.LOCK_TIMEOUT + 3
    assert stored(outbox) == []


def test_check_writable(outbox: Setup) -> None:
    table = outbox.settings.dead_letter_table
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        deadletters.check_writable(conn, table)
        with pytest.raises(ConfigError, match="does not exist"):
            deadletters.check_writable(conn, ("public", "no_such_dead_letters"))


def test_list_mark_and_prune(outbox: Setup) -> None:
    table = outbox.settings.dead_letter_table
    dl = f"{outbox.table}_dead_letter"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {dl} (outbox_id, reason, row_data, lsn, created_at)"
            " SELECT 'id' || i, 'r', '{}', '0/1', now() - i * interval '1 day'"
            " FROM generate_series(1, 10) AS i"
        )
        records = deadletters.list_dead_letters(conn, table)
        assert [r.outbox_id for r in records] == [f"id{i}" for i in range(1, 11)]
        old = [r.id for r in records if r.outbox_id in ("id8", "id9", "id10", "id2")]
        deadletters.mark_replayed(conn, table, old)
        assert len(deadletters.list_dead_letters(conn, table)) == 6
        assert len(deadletters.list_dead_letters(conn, table, include_replayed=True)) == 10
        assert [r.outbox_id for r in deadletters.list_dead_letters(conn, table, ids=old[:1])] == []
        # replayed and older than a week: id8, id9, id10 (id2 is too young)
        assert deadletters.prune(conn, table, timedelta(days=7, hours=1), batch=2) == 3
        # pending ones only with include_pending: id7 (and id2 is still too young)
        pruned = deadletters.prune(conn, table, timedelta(days=6, hours=1), include_pending=True)
        assert pruned == 1
        left = deadletters.list_dead_letters(conn, table, include_replayed=True)
        assert sorted(r.outbox_id for r in left) == sorted(f"id{i}" for i in range(1, 7))


@pytest.mark.asyncio
async def test_a_row_the_server_refuses_is_stored_without_its_row_and_the_rest_whole(
    outbox: Setup,
) -> None:
    """One row whose data Postgres refuses must not fail the batch (and the stream) for ever."""
    dl = f"{outbox.table}_dead_letter"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        # A real refusal with a data error's SQLSTATE, for rows that hold "refuse".
        conn.execute(
            f"CREATE FUNCTION {dl}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.row_data ? 'refuse' THEN"
            " RAISE EXCEPTION 'value out of range' USING ERRCODE = '22003'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON {dl}"
            f" FOR EACH ROW EXECUTE FUNCTION {dl}_refuse()"
        )
    writer = await DeadLetterWriter.connect(outbox.dsn, outbox.settings.dead_letter_table)
    try:
        await writer.write(
            [
                DeadLetter("a", "r", {"id": "a"}, 1),
                DeadLetter("b", "r", {"id": "b", "refuse": "x"}, 2),
                DeadLetter("c", "r", {"id": "c"}, 3),
            ]
        )
    finally:
        await writer.close()
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TRIGGER refuse ON {dl}")
            conn.execute(f"DROP FUNCTION {dl}_refuse()")
    assert stored(outbox) == [
        ("a", "r", {"id": "a"}, "0/1"),
        ("b", "r", {"unstorable": "NumericValueOutOfRange: value out of range"}, "0/2"),
        ("c", "r", {"id": "c"}, "0/3"),
    ]

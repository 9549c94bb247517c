"""Idempotent consumers on a real Postgres (and RabbitMQ for the aio-pika helper)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import psycopg
import pytest

from cdc_relay import inbox
from tests.apps.drivers import ASYNC_DRIVERS, SYNC_DRIVERS
from tests.apps.schema import drop_table


@pytest.fixture
def tables(pg_dsn: str) -> Iterator[tuple[str, str]]:
    """(inbox table, effects table)."""
    tag = uuid.uuid4().hex[:8]
    names = (f"public.inbox_{tag}", f"public.effects_{tag}")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(inbox.ddl(names[0]))
        conn.execute(f"CREATE TABLE {names[1]} (key text NOT NULL)")
    yield names
    for name in names:
        drop_table(pg_dsn, name)


def count(dsn: str, table: str, where: str = "true") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()
    assert row is not None
    return int(row[0])


def handle(conn: psycopg.Connection[Any], tables: tuple[str, str], message_id: str) -> bool:
    inbox_table, effects = tables
    with inbox.once(conn, message_id, table=inbox_table) as first:
        if first:
            conn.execute(f"INSERT INTO {effects} (key) VALUES (%s)", (message_id,))
        return first


def test_ddl_is_idempotent(pg_dsn: str, tables: tuple[str, str]) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(inbox.ddl(tables[0]))


@pytest.mark.parametrize("autocommit", [False, True])
def test_once_runs_the_effect_once_per_id(
    pg_dsn: str, tables: tuple[str, str], autocommit: bool
) -> None:
    with psycopg.connect(pg_dsn, autocommit=autocommit) as conn:
        assert handle(conn, tables, "m1") is True
        assert handle(conn, tables, "m1") is False
        assert handle(conn, tables, "m2") is True
        conn.commit()
    assert count(pg_dsn, tables[1]) == 2
    assert count(pg_dsn, tables[0]) == 2


def test_failed_handler_records_nothing_so_a_retry_runs(
    pg_dsn: str, tables: tuple[str, str]
) -> None:
    inbox_table, effects = tables
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(RuntimeError), inbox.once(conn, "m", table=inbox_table) as first:
            assert first
            conn.execute(f"INSERT INTO {effects} (key) VALUES ('m')")
            raise RuntimeError("handler failed")
        assert count(pg_dsn, effects) == 0 and count(pg_dsn, inbox_table) == 0
        assert handle(conn, tables, "m") is True
    assert count(pg_dsn, effects) == 1


def test_once_inside_an_open_transaction_commits_with_it(
    pg_dsn: str, tables: tuple[str, str]
) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SELECT 1")  # the caller's transaction is open: once() uses a savepoint
        assert handle(conn, tables, "m") is True
        conn.rollback()  # the outer transaction decides: nothing recorded
    assert count(pg_dsn, tables[0]) == 0 and count(pg_dsn, tables[1]) == 0


def test_concurrent_duplicate_waits_and_then_skips(pg_dsn: str, tables: tuple[str, str]) -> None:
    inbox_table, effects = tables
    inside = threading.Event()
    release = threading.Event()
    results: dict[str, bool] = {}

    def first_delivery() -> None:
        with (
            psycopg.connect(pg_dsn, autocommit=True) as conn,
            inbox.once(conn, "m", table=inbox_table) as first,
        ):
            results["a"] = first
            conn.execute(f"INSERT INTO {effects} (key) VALUES ('a')")
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first_delivery)
    thread.start()
    assert inside.wait(10)
    started = time.monotonic()
    threading.Timer(0.5, release.set).start()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        results["b"] = handle(conn, tables, "m")
    thread.join(10)
    assert time.monotonic() - started >= 0.4  # waited for the first one's commit
    assert results == {"a": True, "b": False}
    assert count(pg_dsn, effects) == 1


def test_empty_or_missing_ids_are_refused(pg_dsn: str, tables: tuple[str, str]) -> None:
    with psycopg.connect(pg_dsn) as conn:
        for bad in ("", None, 5):
            with pytest.raises(ValueError, match="message id"), inbox.once(conn, bad):  # type: ignore[arg-type]
                pass


def test_once_takes_only_psycopg_or_sqlalchemy_connections() -> None:
    with (
        pytest.raises(TypeError, match="psycopg Connection or a SQLAlchemy"),
        inbox.once(object(), "m"),
    ):
        pass


@pytest.mark.parametrize("driver", ["sqlalchemy-session", "sqlalchemy-connection"])
def test_once_on_sqlalchemy(pg_dsn: str, tables: tuple[str, str], driver: str) -> None:
    from sqlalchemy import text

    inbox_table, effects = tables
    conn, _commit, rollback, close = SYNC_DRIVERS[driver](pg_dsn)
    try:
        seen = []
        for message_id in ("m1", "m1", "m2"):
            with inbox.once(conn, message_id, table=inbox_table) as first:
                seen.append(first)
                if first:
                    conn.execute(
                        text(f"INSERT INTO {effects} (key) VALUES (:k)"), {"k": message_id}
                    )
        assert seen == [True, False, True]
        with pytest.raises(RuntimeError), inbox.once(conn, "m3", table=inbox_table):
            raise RuntimeError("handler failed")
        assert count(pg_dsn, inbox_table) == 2  # each block committed its own transaction
        conn.execute(text("SELECT 1"))  # an open transaction: once() takes a savepoint in it
        with inbox.once(conn, "m4", table=inbox_table) as first:
            assert first
        rollback()
    finally:
        close()
    assert count(pg_dsn, effects) == 2
    assert count(pg_dsn, inbox_table) == 2  # m3 failed, m4 rolled back with the outer one


def test_cleanup_deletes_only_old_ids_in_batches(pg_dsn: str, tables: tuple[str, str]) -> None:
    inbox_table = tables[0]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {inbox_table} (message_id, processed_at)"
            " SELECT 'old' || i, now() - interval '2 days' FROM generate_series(1, 7) i"
        )
        conn.execute(
            f"INSERT INTO {inbox_table} (message_id) SELECT 'new' || i FROM generate_series(1, 3) i"
        )
        assert inbox.cleanup(conn, timedelta(days=1), table=inbox_table, batch=3) == 7
        assert inbox.cleanup(conn, timedelta(days=1), table=inbox_table, batch=3) == 0
        with pytest.raises(ValueError):
            inbox.cleanup(conn, timedelta(0), table=inbox_table)
    assert count(pg_dsn, inbox_table) == 3
    assert count(pg_dsn, inbox_table, "message_id LIKE 'old%'") == 0


# -- async ----------------------------------------------------------------------------------


async def _asyncpg(dsn: str) -> Any:
    return await asyncpg.connect(dsn)


async def _psycopg_async(dsn: str) -> Any:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def _sqlalchemy_async_session(dsn: str) -> Any:
    return AsyncClosing(*await ASYNC_DRIVERS["sqlalchemy-async-session"](dsn))


async def _sqlalchemy_async_connection(dsn: str) -> Any:
    return AsyncClosing(*await ASYNC_DRIVERS["sqlalchemy-async-connection"](dsn))


class AsyncClosing:
    """A SQLAlchemy async session/connection that takes plain SQL, as the test writes it."""

    def __init__(self, conn: Any, commit: Any, rollback: Any, close: Any) -> None:
        self.conn, self.close = conn, close

    async def execute(self, sql: str) -> None:
        from sqlalchemy import text

        await self.conn.execute(text(sql))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "opener",
    [_asyncpg, _psycopg_async, _sqlalchemy_async_session, _sqlalchemy_async_connection],
    ids=["asyncpg", "psycopg-async", "sqlalchemy-async-session", "sqlalchemy-async-connection"],
)
async def test_once_async(pg_dsn: str, tables: tuple[str, str], opener: Any) -> None:
    inbox_table, effects = tables
    handle = await opener(pg_dsn)
    conn = getattr(handle, "conn", handle)  # what the helper is given
    try:
        seen = []
        for message_id in ("m1", "m1", "m2"):
            async with inbox.once_async(conn, message_id, table=inbox_table) as first:
                seen.append(first)
                if first:
                    await handle.execute(f"INSERT INTO {effects} (key) VALUES ('{message_id}')")
        assert seen == [True, False, True]
        with pytest.raises(RuntimeError):
            async with inbox.once_async(conn, "m3", table=inbox_table) as first:
                assert first
                raise RuntimeError("handler failed")
    finally:
        await handle.close()
    assert count(pg_dsn, effects) == 2
    assert count(pg_dsn, inbox_table) == 2  # m3 rolled back


@pytest.mark.asyncio
async def test_once_async_refuses_other_connections() -> None:
    with pytest.raises(TypeError, match="asyncpg"):
        async with inbox.once_async(object(), "m"):
            pass


# -- aio-pika -------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_aio_pika_handler_acks_after_commit_and_drops_duplicates(
    pg_dsn: str, amqp_url: str, tables: tuple[str, str]
) -> None:
    inbox_table, effects = tables
    failures = {"flaky": 1}
    handled: list[str] = []

    async def handler(conn: Any, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = message.body.decode()
        await conn.execute(f"INSERT INTO {effects} (key) VALUES ($1)", key)
        handled.append(key)
        if failures.get(key, 0) > 0:
            failures[key] -= 1
            raise RuntimeError("first attempt fails after writing: must roll back")

    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"inbox-{uuid.uuid4().hex[:8]}")
        ids = {"a": "id-a", "flaky": "id-flaky", "b": "id-b"}
        for key in ("a", "a", "flaky", "b", "a"):
            await channel.default_exchange.publish(
                aio_pika.Message(key.encode(), message_id=ids[key]), routing_key=queue.name
            )
        await queue.consume(inbox.aio_pika_handler(pool.acquire, handler, table=inbox_table))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            declared = await channel.declare_queue(queue.name, passive=True)
            if (
                declared.declaration_result.message_count == 0
                and count(pg_dsn, effects) == 3
                and len(handled) == 4
            ):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        # Every message settled (acked or rejected): nothing left, nothing unacked.
        await channel.close()
        channel = await connection.channel()
        declared = await channel.declare_queue(queue.name, passive=True)
        assert declared.declaration_result.message_count == 0
        await declared.delete()
    finally:
        await connection.close()
        await pool.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        keys = sorted(r[0] for r in conn.execute(f"SELECT key FROM {effects}"))
    assert keys == ["a", "b", "flaky"]  # once each; the failed attempt rolled back
    assert sorted(handled) == ["a", "b", "flaky", "flaky"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_aio_pika_handler_with_a_connection_factory(
    pg_dsn: str, amqp_url: str, tables: tuple[str, str]
) -> None:
    """``connect`` may return an awaitable connection; it is closed after each message."""
    inbox_table, effects = tables
    opened: list[Any] = []

    async def connect() -> Any:
        conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
        opened.append(conn)
        return conn

    async def handler(conn: Any, message: Any) -> None:
        await conn.execute(f"INSERT INTO {effects} (key) VALUES (%s)", (message.body.decode(),))

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"inbox-{uuid.uuid4().hex[:8]}", auto_delete=True)
        for _ in range(2):
            await channel.default_exchange.publish(
                aio_pika.Message(b"x", message_id="same"), routing_key=queue.name
            )
        await queue.consume(inbox.aio_pika_handler(connect, handler, table=inbox_table))
        deadline = time.monotonic() + 30
        while len(opened) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    finally:
        await connection.close()
    assert len(opened) == 2 and all(c.closed for c in opened)
    assert count(pg_dsn, effects) == 1


@pytest.mark.asyncio
async def test_aio_pika_handler_rejects_a_message_without_id() -> None:
    """aio-pika's publisher always sets an id, other clients may not: such a message
    cannot be deduplicated, so it is rejected without running the handler."""

    class Incoming:  # the two attributes the helper reads, and the call it makes
        message_id = None
        rejected: list[bool] = []

        async def reject(self, requeue: bool) -> None:
            self.rejected.append(requeue)

    async def handler(conn: Any, message: Any) -> None:
        raise AssertionError("must not run")

    message = Incoming()
    await inbox.aio_pika_handler(lambda: None, handler)(message)
    assert message.rejected == [False]

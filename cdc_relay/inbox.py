"""Idempotent consumers: record each message id in the handler's own transaction.

The relay delivers at least once (and Celery with ``acks_late`` runs a task at
least once), so a handler sees duplicates after failures. ``once`` inserts the
message id into ``processed_messages`` in the same transaction as the
handler's writes: both commit or neither does, and a second delivery finds the
id and does nothing. Acknowledge the message only after that commit.

A concurrent duplicate blocks on the first one's uncommitted id row and then
sees it (``first`` is False), so two workers never both run the effect.

Retention: keep ids longer than any message can be redelivered (the relay's
replay window after a crash is minutes; Celery ETA tasks wait until their
eta), then delete them with :func:`cleanup` from a periodic job.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from cdc_relay import schema
from cdc_relay.errors import ConfigError
from cdc_relay.outbox import is_sqlalchemy
from cdc_relay.tracing import TRACE_HEADERS, consumer_span

log = logging.getLogger(__name__)

DEFAULT_TABLE = schema.DEFAULT_INBOX_TABLE
R = TypeVar("R")


def _split(table: str) -> tuple[str, str]:
    try:
        return schema.split_table_name(table)
    except ConfigError as exc:
        raise ValueError(str(exc).replace("--table", "table")) from None


def _qualified(table: str) -> str:
    return schema.qualified_text(_split(table))


def ddl(table: str = DEFAULT_TABLE) -> str:
    """CREATE statements for the processed-messages table (idempotent; for init or migrations)."""
    return schema.inbox_ddl(_split(table)).as_string(None)


def _insert_sql(table: str, style: str) -> str:
    mark = {"format": "%s", "numeric": "$1", "named": ":message_id"}[style]
    return (
        f"INSERT INTO {_qualified(table)} (message_id) VALUES ({mark})"
        " ON CONFLICT (message_id) DO NOTHING RETURNING true"
    )


def _check_id(message_id: Any) -> str:
    if not isinstance(message_id, str) or not message_id:
        raise ValueError(f"an idempotent consumer needs a non-empty message id, got {message_id!r}")
    return message_id


@contextlib.contextmanager
def once(conn: Any, message_id: str, *, table: str = DEFAULT_TABLE) -> Iterator[bool]:
    """``with once(conn, id) as first:`` one transaction (a savepoint if one is open).

    ``first`` is True on the first delivery; the block's writes on ``conn``
    commit together with the id. An exception rolls both back, so the message
    can be retried. Takes a psycopg ``Connection`` or a SQLAlchemy
    ``Session``/``Connection`` (a transaction it begins is committed at the
    end of the block; inside an open one it uses a savepoint).
    """
    import psycopg

    message_id = _check_id(message_id)
    if isinstance(conn, psycopg.Connection):
        with conn.transaction():
            query = _insert_sql(table, "format")
            yield conn.execute(query, (message_id,)).fetchone() is not None
        return
    if is_sqlalchemy(conn, ("Session", "Connection")):
        from sqlalchemy import text

        with conn.begin_nested() if conn.in_transaction() else conn.begin():
            statement = text(_insert_sql(table, "named"))
            yield conn.execute(statement, {"message_id": message_id}).first() is not None
        return
    raise TypeError(
        f"once() takes a psycopg Connection or a SQLAlchemy Session/Connection,"
        f" got {type(conn).__name__}"
    )


@contextlib.asynccontextmanager
async def once_async(
    conn: Any, message_id: str, *, table: str = DEFAULT_TABLE
) -> AsyncIterator[bool]:
    """``once`` for asyncpg, psycopg async and SQLAlchemy ``AsyncSession``/``AsyncConnection``."""
    import psycopg

    message_id = _check_id(message_id)
    if isinstance(conn, psycopg.AsyncConnection):
        async with conn.transaction():
            cursor = await conn.execute(_insert_sql(table, "format"), (message_id,))
            yield await cursor.fetchone() is not None
        return
    if is_sqlalchemy(conn, ("AsyncSession", "AsyncConnection")):
        from sqlalchemy import text

        async with conn.begin_nested() if conn.in_transaction() else conn.begin():
            result = await conn.execute(
                text(_insert_sql(table, "named")), {"message_id": message_id}
            )
            yield result.first() is not None
        return
    if "asyncpg" in sys.modules and hasattr(conn, "fetchval"):
        async with conn.transaction():
            yield await conn.fetchval(_insert_sql(table, "numeric"), message_id) is not None
        return
    raise TypeError(
        "once_async() takes an asyncpg Connection, a psycopg AsyncConnection or a SQLAlchemy"
        f" AsyncSession/AsyncConnection, got {type(conn).__name__}"
    )


def cleanup(
    conn: Any, older_than: timedelta, *, table: str = DEFAULT_TABLE, batch: int = 10_000
) -> int:
    """Delete ids processed more than ``older_than`` ago, in short transactions; returns the count.

    Batches keep each delete's locks and WAL small next to live consumers.
    Takes a psycopg ``Connection`` (autocommit or not: each batch commits).
    """
    if older_than <= timedelta(0) or batch <= 0:
        raise ValueError("older_than and batch must be positive")
    qualified = _qualified(table)
    query = (
        f"DELETE FROM {qualified} WHERE message_id IN (SELECT message_id FROM {qualified}"
        " WHERE processed_at < now() - %s LIMIT %s)"
    )
    total = 0
    while True:
        with conn.transaction():
            deleted: int = conn.execute(query, (older_than, batch)).rowcount
        total += deleted
        if deleted < batch:
            return total


# -- Celery ---------------------------------------------------------------------------------


def celery_once(
    connect: Callable[[], contextlib.AbstractContextManager[Any]], *, table: str = DEFAULT_TABLE
) -> Callable[[Callable[..., R]], Callable[..., R | None]]:
    """Make a Celery task's effect happen once per task id, whatever the deliveries.

    ``connect()`` returns a context manager giving a psycopg ``Connection``
    (``lambda: psycopg.connect(dsn)`` or a pool's ``pool.connection``). The
    function gets that connection first and runs inside ``once``: its writes
    commit with the task id before Celery acks (use ``acks_late=True``). A
    duplicate returns None without calling it::

        @app.task(acks_late=True)
        @inbox.celery_once(lambda: psycopg.connect(DSN))
        def charge(conn, order_id): ...

        enqueue_task(conn, "app.charge", [42])   # the task takes (order_id) only
    """

    def decorate(fn: Callable[..., R]) -> Callable[..., R | None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> R | None:
            from celery import current_task

            request = current_task.request if current_task else None
            task_id = getattr(request, "id", None)
            # Protocol-2 message headers become attributes of the task request.
            headers = {name: getattr(request, name, None) for name in TRACE_HEADERS}
            with (
                consumer_span(f"{getattr(current_task, 'name', fn.__name__)} process", headers),
                connect() as conn,
                once(conn, _check_id(task_id), table=table) as first,
            ):
                if not first:
                    log.info("task %s already processed; skipping the duplicate", task_id)
                    return None
                return fn(conn, *args, **kwargs)

        # Celery checks call arguments against the signature: hide the injected conn.
        params = list(inspect.signature(fn).parameters.values())[1:]
        wrapper.__signature__ = inspect.signature(fn).replace(parameters=params)  # type: ignore[attr-defined]  # inspect reads it
        return wrapper

    return decorate


# -- aio-pika -------------------------------------------------------------------------------


def aio_pika_handler(
    connect: Callable[[], Any],
    handler: Callable[[Any, Any], Awaitable[None]],
    *,
    table: str = DEFAULT_TABLE,
) -> Callable[[Any], Awaitable[None]]:
    """An aio-pika ``queue.consume`` callback that runs ``handler(conn, message)`` once per id.

    ``connect()`` is an async context manager giving an asyncpg or psycopg
    async connection (``pool.acquire()``), or an awaitable of one (closed
    afterwards). The message is acked after the transaction commits, requeued
    (nack) if the handler raises (consume with manual acks), and acked without
    calling the handler when its ``message_id`` was already processed. A
    message without an id cannot be deduplicated: it is rejected (to the
    queue's dead-letter exchange, if any).
    """

    async def on_message(message: Any) -> None:
        message_id = message.message_id
        if not message_id:
            log.error("message without message_id rejected: cannot deduplicate it")
            await message.reject(requeue=False)
            return
        try:
            with consumer_span(
                f"{message.routing_key or message.exchange} process", message.headers
            ):
                async with (
                    _connection(connect) as conn,
                    once_async(conn, message_id, table=table) as first,
                ):
                    if first:
                        await handler(conn, message)
                    else:
                        log.info("message %s already processed; acking the duplicate", message_id)
        except Exception:
            log.exception("handler failed for message %s; requeued", message_id)
            await message.nack(requeue=True)
            return
        await message.ack()  # only after the id and the handler's writes committed

    return on_message


@contextlib.asynccontextmanager
async def _connection(connect: Callable[[], Any]) -> AsyncIterator[Any]:
    made = connect()
    if hasattr(made, "__aenter__"):
        async with made as conn:
            yield conn
        return
    conn = await made
    try:
        yield conn
    finally:
        await conn.close()

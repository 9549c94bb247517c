"""Enqueue outbox rows (events and Celery tasks) inside the caller's transaction.

The whole point of an outbox is that the message exists if and only if the
business transaction commits, so these helpers never commit, never open a
transaction of their own and refuse to run on a connection that would commit
the row at once (autocommit outside a transaction block).

Values are serialised with orjson: dataclasses become objects, datetimes
RFC 3339 strings (naive ones without an offset), UUIDs strings, Decimals
strings (exact; a JSON number would round through a float), enums their
value. A row the relay could never publish (bad header types, nesting too
deep, names or values too long, a payload over the broker's default
``max_message_size``) is refused here with :class:`EnqueueError`, using the
router's own checks, while the caller can still fix the call. Two checks
depend on the relay's options and stay with the relay (a refused row is
dead-lettered there, with its reason): the routing-key template, when a row
has no ``routing_key``, and ``--allowed-exchanges`` / CC and BCC headers.

Drivers: psycopg ``Connection``, SQLAlchemy ``Session``/``Connection``
(``enqueue``, ``enqueue_task``); asyncpg ``Connection``, psycopg
``AsyncConnection``, SQLAlchemy ``AsyncSession``/``AsyncConnection``
(``enqueue_async``, ``enqueue_task_async``). Django: ``cdc_relay.contrib.django``.
"""

from __future__ import annotations

import decimal
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from cdc_relay import schema, tracing
from cdc_relay.celery_message import TASK_AGGREGATE_TYPE
from cdc_relay.errors import ConfigError
from cdc_relay.router import Router
from cdc_relay.rows import OutboxRow, UnmappableRow

DEFAULT_TABLE = schema.DEFAULT_OUTBOX_TABLE
# RabbitMQ 4's default max_message_size; a bigger body is refused by the broker.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
# Applies every per-row check of the relay; the routing-key template is the
# relay's configuration, so an empty one stands in (it renders to "").
_CHECKER = Router(routing_key_template="", allow_cc_headers=True)
_COLUMNS = schema.OUTBOX_INSERT_COLUMNS
_CASTS = ("uuid", None, None, None, "jsonb", "jsonb", None, None)


class EnqueueError(ValueError):
    """The row could never be published (or would not be transactional): fix the call."""


@dataclass(frozen=True, slots=True)
class Insert:
    """One prepared outbox row: the values, checked and serialised; no I/O yet."""

    table: tuple[str, str]
    id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: str
    headers: str
    exchange: str | None
    routing_key: str | None

    @property
    def values(self) -> tuple[str | None, ...]:
        return (
            self.id,
            self.aggregate_type,
            self.aggregate_id,
            self.event_type,
            self.payload,
            self.headers,
            self.exchange,
            self.routing_key,
        )

    def sql(self, style: str) -> str:
        """The INSERT with placeholders of one paramstyle: ``format``, ``named``, ``numeric``."""
        marks = []
        for i, (column, cast) in enumerate(zip(_COLUMNS, _CASTS, strict=True)):
            mark = {"format": "%s", "named": f":{column}", "numeric": f"${i + 1}"}[style]
            marks.append(f"CAST({mark} AS {cast})" if cast else mark)
        return (
            f"INSERT INTO {schema.qualified_text(self.table)} ({', '.join(_COLUMNS)})"
            f" VALUES ({', '.join(marks)})"
        )

    def params(self) -> dict[str, str | None]:
        return dict(zip(_COLUMNS, self.values, strict=True))


def _table(name: str) -> tuple[str, str]:
    try:
        return schema.split_table_name(name)
    except ConfigError as exc:
        raise EnqueueError(str(exc).replace("--table", "table")) from None


def qualified_name(table: str) -> str:
    """``schema.table`` (unquoted, as --table takes it) as a quoted SQL identifier."""
    return schema.qualified_text(_table(table))


def outbox_ddl(table: str = DEFAULT_TABLE) -> str:
    """The outbox CREATE TABLE IF NOT EXISTS that ``cdc-relay init`` runs, for migrations."""
    return schema.outbox_ddl(_table(table)).as_string(None)


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> str:
    """JSON text as the outbox stores it (see the module doc for the type mapping)."""
    try:
        text = orjson.dumps(value, default=_default)
    except orjson.JSONEncodeError as exc:
        raise EnqueueError(f"cannot serialise to JSON: {exc}") from None
    if b"\\u0000" in text:
        raise EnqueueError("Postgres jsonb cannot store the character U+0000")
    return text.decode()


def _text(what: str, value: str | int | uuid.UUID) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | uuid.UUID):
        raise EnqueueError(f"{what} must be a string, got {type(value).__name__}")
    text = str(value)
    if "\x00" in text:
        raise EnqueueError(f"{what} contains a NUL character, which Postgres text cannot store")
    return text


def _headers_json(headers: Mapping[str, Any] | None) -> str:
    if headers is not None and not isinstance(headers, Mapping):
        raise EnqueueError(f"headers must be a mapping, got {type(headers).__name__}")
    return dumps(tracing.with_trace_headers(headers))


def _check(insert: Insert) -> Insert:
    if len(insert.payload) > MAX_PAYLOAD_BYTES // 4 and (
        len(insert.payload.encode()) > MAX_PAYLOAD_BYTES
    ):
        raise EnqueueError(f"payload larger than the broker's {MAX_PAYLOAD_BYTES} bytes")
    row = OutboxRow(
        insert.id,
        insert.aggregate_type,
        insert.aggregate_id,
        insert.event_type,
        insert.payload.encode(),
        insert.headers.encode(),
        insert.exchange,
        insert.routing_key,
    )
    try:
        _CHECKER.route(row)
    except UnmappableRow as exc:
        raise EnqueueError(f"the relay could never publish this row: {exc}") from None
    return insert


def prepare_event(
    aggregate_type: str,
    aggregate_id: str | int | uuid.UUID,
    event_type: str,
    payload: Any,
    *,
    headers: Mapping[str, Any] | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> Insert:
    """An event row, checked: what ``enqueue`` inserts (pure, for tests and other drivers)."""
    aggregate_type = _text("aggregate_type", aggregate_type)
    if aggregate_type == TASK_AGGREGATE_TYPE:
        raise EnqueueError(f"aggregate_type {TASK_AGGREGATE_TYPE!r} is reserved: use enqueue_task")
    return _check(
        Insert(
            table=_table(table),
            id=str(uuid.uuid4()),
            aggregate_type=aggregate_type,
            aggregate_id=_text("aggregate_id", aggregate_id),
            event_type=_text("event_type", event_type),
            payload=dumps(payload),
            headers=_headers_json(headers),
            exchange=None if exchange is None else _text("exchange", exchange),
            routing_key=None if routing_key is None else _text("routing_key", routing_key),
        )
    )


def prepare_task(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    queue: str = "celery",
    countdown: float | None = None,
    eta: datetime | None = None,
    expires: float | datetime | None = None,
    priority: int | None = None,
    headers: Mapping[str, Any] | None = None,
    table: str = DEFAULT_TABLE,
    now: datetime | None = None,
) -> Insert:
    """A Celery task row (``aggregate_type = 'celery.task'``), checked; see docs/guides/celery.md.

    ``countdown`` and a relative ``expires`` count from ``now`` (enqueue time,
    as Celery's ``apply_async`` does); naive datetimes are taken as UTC.
    """
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise EnqueueError("task args must be a list or tuple")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise EnqueueError("task kwargs must be a mapping")
    if countdown is not None and eta is not None:
        raise EnqueueError("give countdown or eta, not both")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255
    ):
        raise EnqueueError(f"priority must be an integer 0-255, got {priority!r}")
    now = now or datetime.now(UTC)
    if countdown is not None:
        eta = now + timedelta(seconds=_seconds("countdown", countdown))
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        expires = now + timedelta(seconds=_seconds("expires", expires))
    task_id = str(uuid.uuid4())
    payload: dict[str, Any] = {
        "args": list(args),
        "kwargs": dict(kwargs or {}),
        "eta": _iso("eta", eta),
        "expires": _iso("expires", expires),
        "priority": priority,
        **_celery_parent(),
    }
    return _check(
        Insert(
            table=_table(table),
            id=task_id,
            aggregate_type=TASK_AGGREGATE_TYPE,
            aggregate_id=task_id,
            event_type=_text("task name", name),
            payload=dumps(payload),
            headers=_headers_json(headers),
            exchange=None,
            routing_key=_text("queue", queue),
        )
    )


def _seconds(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value == value:
        raise EnqueueError(f"{what} must be a number of seconds, got {value!r}")
    return float(value)


def _iso(what: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise EnqueueError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    iso: str = value.isoformat()
    return iso


def _celery_parent() -> dict[str, str]:
    """root_id/parent_id when enqueued from inside a running Celery task, as Celery sets them."""
    celery = sys.modules.get("celery")
    if celery is None:
        return {}
    task = getattr(celery, "current_task", None)
    request = getattr(task, "request", None) if task else None
    parent = getattr(request, "id", None)
    if not isinstance(parent, str):
        return {}
    root = getattr(request, "root_id", None)
    return {"parent_id": parent, "root_id": root if isinstance(root, str) else parent}


# -- drivers ------------------------------------------------------------------------------


def is_sqlalchemy(conn: Any, names: tuple[str, ...]) -> bool:
    """Whether ``conn`` is one of these SQLAlchemy classes, without importing SQLAlchemy."""
    if "sqlalchemy" not in sys.modules:
        return False
    return any(
        cls.__module__.startswith("sqlalchemy") and cls.__name__ in names
        for cls in type(conn).__mro__
    )


def execute(conn: Any, insert: Insert) -> None:
    """Insert on a synchronous connection, in its current transaction."""
    import psycopg

    if isinstance(conn, psycopg.Connection):
        if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            raise EnqueueError(
                "autocommit connection outside a transaction: the row would be published even"
                " if the rest of your work fails; use `with conn.transaction():`"
            )
        conn.execute(insert.sql("format"), insert.values)
        return
    if is_sqlalchemy(conn, ("Session", "Connection")):
        from sqlalchemy import text

        conn.execute(text(insert.sql("named")), insert.params())
        return
    raise TypeError(
        f"enqueue() takes a psycopg Connection or a SQLAlchemy Session/Connection, got"
        f" {type(conn).__name__} (use enqueue_async for async drivers)"
    )


async def execute_async(conn: Any, insert: Insert) -> None:
    """Insert on an asynchronous connection, in its current transaction."""
    import psycopg

    if isinstance(conn, psycopg.AsyncConnection):
        if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            raise EnqueueError(
                "autocommit connection outside a transaction: the row would be published even"
                " if the rest of your work fails; use `async with conn.transaction():`"
            )
        await conn.execute(insert.sql("format"), insert.values)
        return
    if is_sqlalchemy(conn, ("AsyncSession", "AsyncConnection")):
        from sqlalchemy import text

        await conn.execute(text(insert.sql("named")), insert.params())
        return
    if "asyncpg" in sys.modules and hasattr(conn, "is_in_transaction"):
        if not conn.is_in_transaction():
            raise EnqueueError(
                "asyncpg connection outside a transaction: the row would be published even"
                " if the rest of your work fails; use `async with conn.transaction():`"
            )
        await conn.execute(insert.sql("numeric"), *insert.values)
        return
    raise TypeError(
        "enqueue_async() takes an asyncpg Connection, a psycopg AsyncConnection or a SQLAlchemy"
        f" AsyncSession/AsyncConnection, got {type(conn).__name__}"
    )


def enqueue(
    conn: Any,
    aggregate_type: str,
    aggregate_id: str | int | uuid.UUID,
    event_type: str,
    payload: Any,
    *,
    headers: Mapping[str, Any] | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> str:
    """Insert one event row in ``conn``'s transaction; returns its id (the AMQP message_id)."""
    insert = prepare_event(
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        headers=headers,
        exchange=exchange,
        routing_key=routing_key,
        table=table,
    )
    execute(conn, insert)
    return insert.id


async def enqueue_async(
    conn: Any,
    aggregate_type: str,
    aggregate_id: str | int | uuid.UUID,
    event_type: str,
    payload: Any,
    *,
    headers: Mapping[str, Any] | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    table: str = DEFAULT_TABLE,
) -> str:
    """``enqueue`` for asyncpg, psycopg async and SQLAlchemy async connections."""
    insert = prepare_event(
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        headers=headers,
        exchange=exchange,
        routing_key=routing_key,
        table=table,
    )
    await execute_async(conn, insert)
    return insert.id


def enqueue_task(
    conn: Any,
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    queue: str = "celery",
    countdown: float | None = None,
    eta: datetime | None = None,
    expires: float | datetime | None = None,
    priority: int | None = None,
    table: str = DEFAULT_TABLE,
) -> str:
    """A durable ``delay_on_commit``: the task exists iff the transaction commits.

    Returns the task id (also the outbox id and the AMQP message_id).
    """
    insert = prepare_task(
        name,
        args,
        kwargs,
        queue=queue,
        countdown=countdown,
        eta=eta,
        expires=expires,
        priority=priority,
        table=table,
    )
    execute(conn, insert)
    return insert.id


async def enqueue_task_async(
    conn: Any,
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    queue: str = "celery",
    countdown: float | None = None,
    eta: datetime | None = None,
    expires: float | datetime | None = None,
    priority: int | None = None,
    table: str = DEFAULT_TABLE,
) -> str:
    """``enqueue_task`` for the async drivers ``enqueue_async`` takes."""
    insert = prepare_task(
        name,
        args,
        kwargs,
        queue=queue,
        countdown=countdown,
        eta=eta,
        expires=expires,
        priority=priority,
        table=table,
    )
    await execute_async(conn, insert)
    return insert.id

"""Enqueue helpers: on every supported driver a committed row is there with the
documented mapping (checked through ``Router.route``, as the relay will read
it), a rolled-back row is not; what the relay could never publish is refused
at enqueue time."""

from __future__ import annotations

import dataclasses
import decimal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
import pytest

from cdc_relay import outbox
from cdc_relay.celery_message import TASK_AGGREGATE_TYPE
from cdc_relay.envelope import Envelope
from cdc_relay.outbox import EnqueueError, enqueue, enqueue_async, enqueue_task, enqueue_task_async
from cdc_relay.router import Router
from tests.apps.drivers import ASYNC_DRIVERS, SYNC_DRIVERS
from tests.apps.schema import create_outbox, drop_table, read_rows, unique_table


@dataclasses.dataclass
class Order:
    id: uuid.UUID
    total: decimal.Decimal
    placed_at: datetime
    lines: list[str]


ORDER = Order(
    uuid.UUID("6f1c4a52-8d5e-4c1a-9a43-8d2b1c0e7f11"),
    decimal.Decimal("12.10"),
    datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
    ["a", "ü€"],
)
ORDER_JSON = {
    "id": "6f1c4a52-8d5e-4c1a-9a43-8d2b1c0e7f11",
    "total": "12.10",
    "placed_at": "2026-11-23T10:00:00+00:00",
    "lines": ["a", "ü€"],
}


@pytest.fixture
def table(pg_dsn: str) -> Iterator[str]:
    name = unique_table()
    create_outbox(pg_dsn, name)
    yield name
    drop_table(pg_dsn, name)


def assert_event(env: Envelope, event_id: str) -> None:
    assert env.message_id == event_id
    assert (env.exchange, env.routing_key) == ("outbox", "order.OrderPlaced")
    assert orjson.loads(env.body) == ORDER_JSON
    assert env.type == "OrderPlaced"
    assert env.headers == {
        "tenant": "acme",
        "n": 3,
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderPlaced",
    }
    assert env.timestamp is not None


def assert_task(env: Envelope, task_id: str) -> None:
    assert env.message_id == env.correlation_id == env.headers["id"] == task_id
    assert (env.exchange, env.routing_key) == ("", "mail")
    args, kwargs, _ = orjson.loads(env.body)
    assert [args, kwargs] == [[1, "x"], {"to": "a@example.org"}]
    assert env.headers["task"] == "app.tasks.send_mail"
    assert env.headers["retries"] == 0 and env.headers["root_id"] == task_id
    assert env.headers["eta"] is not None  # countdown=30
    assert env.priority == 5


def check_committed(dsn: str, table: str, event_id: str, task_id: str) -> None:
    rows = {row.id: row for row in read_rows(dsn, table)}
    assert set(rows) == {event_id, task_id}
    assert rows[task_id].aggregate_type == TASK_AGGREGATE_TYPE
    router = Router()
    assert_event(router.route(rows[event_id]), event_id)
    assert_task(router.route(rows[task_id]), task_id)
    eta = datetime.fromisoformat(router.route(rows[task_id]).headers["eta"])
    assert timedelta(seconds=20) < eta - datetime.now(UTC) <= timedelta(seconds=30)


EVENT: dict[str, Any] = {"headers": {"tenant": "acme", "n": 3}}
TASK: dict[str, Any] = {"queue": "mail", "countdown": 30, "priority": 5}


@pytest.mark.parametrize("driver", list(SYNC_DRIVERS))
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_sync_drivers(pg_dsn: str, table: str, driver: str, outcome: str) -> None:
    conn, commit, rollback, close = SYNC_DRIVERS[driver](pg_dsn)
    try:
        event_id = enqueue(conn, "order", 42, "OrderPlaced", ORDER, table=table, **EVENT)
        task_id = enqueue_task(
            conn, "app.tasks.send_mail", (1, "x"), {"to": "a@example.org"}, table=table, **TASK
        )
        (commit if outcome == "commit" else rollback)()
    finally:
        close()
    if outcome == "commit":
        check_committed(pg_dsn, table, event_id, task_id)
    else:
        assert read_rows(pg_dsn, table) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", list(ASYNC_DRIVERS))
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_async_drivers(pg_dsn: str, table: str, driver: str, outcome: str) -> None:
    conn, commit, rollback, close = await ASYNC_DRIVERS[driver](pg_dsn)
    try:
        event_id = await enqueue_async(
            conn, "order", 42, "OrderPlaced", ORDER, table=table, **EVENT
        )
        task_id = await enqueue_task_async(
            conn, "app.tasks.send_mail", [1, "x"], {"to": "a@example.org"}, table=table, **TASK
        )
        await (commit if outcome == "commit" else rollback)()
    finally:
        await close()
    if outcome == "commit":
        check_committed(pg_dsn, table, event_id, task_id)
    else:
        assert read_rows(pg_dsn, table) == []


def test_enqueue_never_commits(pg_dsn: str, table: str) -> None:
    """The caller's transaction stays open; the row is invisible to others until it commits."""
    with psycopg.connect(pg_dsn) as conn:
        enqueue(conn, "order", 1, "A", {}, table=table)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert read_rows(pg_dsn, table) == []
        conn.commit()
    assert len(read_rows(pg_dsn, table)) == 1


def test_autocommit_outside_a_transaction_is_refused(pg_dsn: str, table: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(EnqueueError, match="outside a transaction"):
            enqueue(conn, "order", 1, "A", {}, table=table)
        with conn.transaction():
            enqueue(conn, "order", 1, "A", {}, table=table)
    assert len(read_rows(pg_dsn, table)) == 1


@pytest.mark.asyncio
async def test_asyncpg_outside_a_transaction_is_refused(pg_dsn: str, table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(pg_dsn)
    try:
        with pytest.raises(EnqueueError, match="outside a transaction"):
            await enqueue_async(conn, "order", 1, "A", {}, table=table)
        async with conn.transaction():
            await enqueue_async(conn, "order", 1, "A", {}, table=table)
    finally:
        await conn.close()
    assert len(read_rows(pg_dsn, table)) == 1


@pytest.mark.asyncio
async def test_psycopg_async_autocommit_outside_a_transaction_is_refused(
    pg_dsn: str, table: str
) -> None:
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        with pytest.raises(EnqueueError, match="outside a transaction"):
            await enqueue_async(conn, "order", 1, "A", {}, table=table)
    finally:
        await conn.close()


def test_wrong_connection_types_say_what_is_supported(pg_dsn: str) -> None:
    with pytest.raises(TypeError, match="psycopg Connection"):
        enqueue(object(), "order", 1, "A", {})
    with psycopg.connect(pg_dsn) as conn, pytest.raises(TypeError, match="enqueue_async"):
        enqueue(conn.cursor(), "order", 1, "A", {})


@pytest.mark.asyncio
async def test_sync_connection_given_to_enqueue_async_is_a_type_error(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn, pytest.raises(TypeError, match="asyncpg"):
        await enqueue_async(conn, "order", 1, "A", {})


def test_quoted_schema_and_table_names(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA IF NOT EXISTS "My Schema"')
    table = 'My Schema.Out"box'
    create_outbox(pg_dsn, table)
    try:
        with psycopg.connect(pg_dsn) as conn:
            enqueue(conn, "order", 1, "A", {}, table=table)
        assert len(read_rows(pg_dsn, '"My Schema"."Out""box"')) == 1
    finally:
        drop_table(pg_dsn, '"My Schema"."Out""box"')


# -- pure: serialisation and refusal (no server) ------------------------------------------


def test_serialisation_of_common_types() -> None:
    class Color(str, __import__("enum").Enum):
        RED = "red"

    insert = outbox.prepare_event(
        "order",
        uuid.UUID(int=7),
        "E",
        {
            "order": ORDER,
            "naive": datetime(2026, 1, 1, 12, 0),
            "aware": datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
            "d": decimal.Decimal("1e-30"),
            "color": Color.RED,
        },
    )
    assert orjson.loads(insert.payload) == {
        "order": ORDER_JSON,
        "naive": "2026-01-01T12:00:00",
        "aware": "2026-01-01T12:00:00+02:00",
        "d": "1E-30",
        "color": "red",
    }
    assert insert.aggregate_id == "00000000-0000-0000-0000-000000000007"
    uuid.UUID(insert.id)  # a real uuid, so the uuid column accepts it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"headers": {"deep": [[[[[[[[[[1]]]]]]]]]] * 1}}, None),  # fine: 11 levels
        ({"headers": {"deep": orjson.loads(b"[" * 80 + b"]" * 80)}}, "nested deeper"),
        ({"headers": {"big": "x" * 200_000}}, "one AMQP frame"),
        ({"headers": {"k" * 256: 1}}, "header name longer"),
        ({"headers": {"t": {"k" * 129: 1}}}, "nested name longer"),
        ({"headers": {"n": 2**64}}, "cannot serialise"),
        ({"headers": {"s": {1, 2}}}, "cannot serialise"),
        ({"headers": ["not", "a", "mapping"]}, "mapping"),
        ({"exchange": "has space"}, "invalid exchange name"),
        ({"exchange": ""}, None),  # the default exchange
        ({"routing_key": "k" * 256}, "routing key longer"),
        ({"event_type": "E" * 256}, "event_type longer"),
        ({"payload": {"s": "a\x00b"}}, "U\\+0000"),
        ({"payload": {"n": 2**70}}, "cannot serialise"),
        ({"payload": object()}, "cannot serialise"),
        ({"aggregate_type": "a\x00"}, "NUL"),
        ({"aggregate_type": TASK_AGGREGATE_TYPE}, "reserved"),
        ({"aggregate_id": 1.5}, "aggregate_id must be a string"),
        ({"aggregate_id": True}, "aggregate_id must be a string"),
    ],
)
def test_what_the_relay_could_never_publish_is_refused_at_enqueue(
    kwargs: dict[str, Any], message: str | None
) -> None:
    call: dict[str, Any] = {
        "aggregate_type": "order",
        "aggregate_id": 1,
        "event_type": "E",
        "payload": {},
    }
    call.update(kwargs)
    args = [call.pop(k) for k in ("aggregate_type", "aggregate_id", "event_type", "payload")]
    if message is None:
        insert = outbox.prepare_event(*args, **call)
        Router().route(_row(insert))
        return
    with pytest.raises(EnqueueError, match=message):
        outbox.prepare_event(*args, **call)


def test_oversized_payload_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "MAX_PAYLOAD_BYTES", 1000)
    outbox.prepare_event("order", 1, "E", {"s": "x" * 900})
    with pytest.raises(EnqueueError, match="larger than"):
        outbox.prepare_event("order", 1, "E", {"s": "x" * 1000})
    with pytest.raises(EnqueueError, match="larger than"):
        outbox.prepare_event("order", 1, "E", {"s": "é" * 500})  # 508 characters


def test_bad_table_names_are_refused() -> None:
    with pytest.raises(ValueError, match="table"):
        outbox.prepare_event("order", 1, "E", {}, table="a.b.c")


def _row(insert: outbox.Insert) -> Any:
    from cdc_relay.rows import OutboxRow

    return OutboxRow(
        insert.id,
        insert.aggregate_type,
        insert.aggregate_id,
        insert.event_type,
        insert.payload.encode(),
        insert.headers.encode(),
        insert.exchange,
        insert.routing_key,
        None,
    )


NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_task_countdown_eta_expires_priority() -> None:
    router = Router()
    env = router.route(_row(outbox.prepare_task("t", countdown=90, expires=3600, now=NOW)))
    assert env.headers["eta"] == "2026-11-23T10:01:30+00:00"
    assert env.headers["expires"] == "2026-11-23T11:00:00+00:00"
    eta = datetime(2026, 11, 24, 8, 0)  # naive: UTC, as Celery's default timezone
    expires = datetime(2026, 11, 25, 8, 0, tzinfo=timezone(timedelta(hours=1)))
    env = router.route(_row(outbox.prepare_task("t", eta=eta, expires=expires, priority=0)))
    assert env.headers["eta"] == "2026-11-24T08:00:00+00:00"
    assert env.headers["expires"] == "2026-11-25T08:00:00+01:00"
    assert env.priority == 0
    env = router.route(_row(outbox.prepare_task("t")))
    assert env.headers["eta"] is None and env.headers["expires"] is None and env.priority is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"countdown": 5, "eta": NOW}, "not both"),
        ({"priority": 256}, "priority"),
        ({"priority": True}, "priority"),
        ({"countdown": "5"}, "countdown"),
        ({"countdown": float("nan")}, "countdown"),
        ({"eta": "tomorrow"}, "eta must be a datetime"),
        ({"args": "abc"}, "list or tuple"),
        ({"kwargs": [1]}, "mapping"),
        ({"args": [orjson.loads(b"[" * 300 + b"]" * 300)]}, "cannot serialise"),
        ({"args": [{"deep": orjson.loads(b"[" * 200 + b"]" * 200)}]}, None),
        ({"queue": "q" * 256}, "routing key longer"),
        ({"name": "n" * 300}, None),  # the task name is a header value, not a short string
    ],
)
def test_task_arguments_are_checked(kwargs: dict[str, Any], message: str | None) -> None:
    name = kwargs.pop("name", "t")
    if message is None:
        Router().route(_row(outbox.prepare_task(name, **kwargs)))
        return
    with pytest.raises(EnqueueError, match=message):
        outbox.prepare_task(name, **kwargs)


def test_tasks_enqueued_from_a_running_task_carry_parent_and_root() -> None:
    """As Celery's apply_async does inside a task: parent_id = current task, root kept."""
    celery = pytest.importorskip("celery")
    app = celery.Celery("t", broker="memory://", set_as_current=False)
    seen: dict[str, Any] = {}

    @app.task
    def parent() -> None:
        env = Router().route(_row(outbox.prepare_task("child")))
        seen.update(env.headers)

    @app.task
    def root() -> None:
        parent.apply(task_id="parent-id")

    root.apply(task_id="root-id")  # runs eagerly, with the request stack a worker has
    assert (seen["parent_id"], seen["root_id"]) == ("parent-id", "root-id")
    outside = Router().route(_row(outbox.prepare_task("child")))
    assert outside.headers["parent_id"] is None
    assert outside.headers["root_id"] == outside.message_id

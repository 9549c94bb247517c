"""Existing tables end to end: Debezium's layout, header columns, per-row AMQP properties and
every invalid value as a dead letter, against real Postgres and RabbitMQ (issue 21)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
import psycopg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelPreconditionFailed

from cdc_relay.errors import ConfigError
from cdc_relay.pg import checks
from cdc_relay.router import amqp_users
from tests.harness import Consumer, Delivery, Setup, run_cli, unique_names

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# Debezium's documented outbox table, plus a tenant column an app placed in a header.
DEBEZIUM_DDL = """CREATE TABLE {table} (
    id uuid NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    timestamp timestamp NOT NULL DEFAULT now(),
    payload jsonb,
    tracingspancontext varchar(256),
    tenant_id text,
    shard int
)"""
MAPPING = (
    "--layout",
    "debezium",
    "--header-column",
    "tenant_id:x-tenant",
    "--header-column",
    "shard",
    "--column",
    "correlation_id=aggregateid",
)


class PropertiesConsumer(Consumer):
    """Keeps every AMQP property a row can set."""

    def record(self, message: AbstractIncomingMessage) -> None:
        super().record(message)
        self.deliveries[-1].properties.update(
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            expiration=message.expiration,
            priority=message.priority,
            content_encoding=message.content_encoding,
            user_id=message.user_id,
        )


@pytest.fixture
def debezium(pg_dsn: str, amqp_url: str) -> Iterator[Setup]:
    """A Debezium outbox table made by the app, then `init --no-table --layout debezium`."""
    setup = Setup(pg_dsn, amqp_url, unique_names("dbz"))
    setup.settings = dataclasses.replace(
        setup.settings,
        layout="debezium",
        header_column=["tenant_id:x-tenant", "shard"],
        column=["correlation_id=aggregateid"],
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DEBEZIUM_DDL.format(table=setup.table))
    lines = setup.init(create_table=False)
    assert any("its columns fit --layout debezium" in line for line in lines), lines
    yield setup
    setup.cleanup()


@pytest_asyncio.fixture
async def watcher(debezium: Setup) -> AsyncIterator[PropertiesConsumer]:
    c = PropertiesConsumer(debezium.amqp_url, debezium.names["exchange"])
    await c.start()
    yield c
    await c.close()


def debezium_insert(conn: psycopg.Connection[Any], table: str, **row: Any) -> str:
    """An INSERT the way Debezium's users write one: their columns, their values."""
    row_id = str(uuid.uuid4())
    conn.execute(
        f"INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload,"
        " tracingspancontext, tenant_id, shard) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            row_id,
            row.get("aggregatetype", "order"),
            row.get("aggregateid", "42"),
            row.get("type", "OrderCreated"),
            row.get("payload", '{"total": 12.5, "items": ["a", "ü"]}'),
            row.get("tracingspancontext"),
            row.get("tenant_id"),
            row.get("shard"),
        ),
    )
    return row_id


def dead_letters(setup: Setup) -> dict[str | None, str]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT outbox_id, reason FROM {setup.table}_dead_letter ORDER BY id"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


@pytest.mark.asyncio
async def test_debezium_rows_relayed(
    debezium: Setup, watcher: PropertiesConsumer, relays: Any
) -> None:
    relay = relays(debezium, *MAPPING)
    relay.wait_for_log("streaming from slot")
    span = f"#Thu Jan 01 00:00:00 UTC 2026\ntraceparent={TRACEPARENT}\ntracestate=k=v\n"
    with psycopg.connect(debezium.dsn) as conn:  # app transactions: two rows, then one
        first = debezium_insert(
            conn, debezium.table, tracingspancontext=span, tenant_id="acme", shard=7
        )
        second = debezium_insert(conn, debezium.table, type="OrderPaid", aggregateid="43")
        conn.commit()
        bad_trace = debezium_insert(
            conn, debezium.table, tracingspancontext="uber-trace-id=1:2:0:1"
        )
        tombstone = debezium_insert(conn, debezium.table, payload=None)
        third = debezium_insert(conn, debezium.table, aggregatetype="invoice", type="Sent")
        conn.commit()
        stored = conn.execute(
            f"SELECT payload::text, timestamp FROM {debezium.table} WHERE id = %s", (first,)
        ).fetchone()
    assert stored is not None
    await watcher.wait_for({first, second, third})
    by_id: dict[str, Delivery] = {d.message_id: d for d in watcher.deliveries}
    assert watcher.ids() == [first, second, third]  # commit order; the bad row is not among them
    one = by_id[first]
    assert one.routing_key == "order.OrderCreated"
    assert one.body == stored[0].encode()
    assert orjson.loads(one.body) == {"total": 12.5, "items": ["a", "ü"]}
    assert one.headers == {
        "x-tenant": "acme",
        "shard": 7,
        "traceparent": TRACEPARENT,
        "tracestate": "k=v",
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
    }
    assert one.properties["type"] == "OrderCreated"
    assert one.properties["correlation_id"] == "42"
    assert one.properties["content_type"] == "application/json"
    # A `timestamp` (without time zone) column is read as UTC; compared as UTC, so that the
    # test process's own time zone (Django's settings set TZ) cannot change the answer.
    written = stored[1] if stored[1].tzinfo else stored[1].replace(tzinfo=UTC)
    assert int(one.properties["timestamp"].timestamp()) == int(written.timestamp())
    two = by_id[second]
    assert two.routing_key == "order.OrderPaid" and two.properties["correlation_id"] == "43"
    assert "x-tenant" not in two.headers and "traceparent" not in two.headers
    assert by_id[third].routing_key == "invoice.Sent"
    letters = dead_letters(debezium)
    assert list(letters) == [bad_trace, tombstone]
    assert "no valid W3C traceparent" in letters[bad_trace]
    assert "column payload is NULL" in letters[tombstone]


@pytest.mark.asyncio
async def test_properties_and_every_invalid_value(
    outbox: Setup, relays: Any, amqp_url: str
) -> None:
    """Reserved header names become properties; each invalid one is a dead letter, in order."""
    user = next(iter(amqp_users([amqp_url])))
    consumer = await PropertiesConsumer(amqp_url, outbox.names["exchange"]).start()
    try:
        relay = relays(outbox)
        relay.wait_for_log("streaming from slot")
        valid = {
            "correlation_id": "c-1",
            "reply_to": "replies",
            "expiration": "600000",
            "priority": 5,
            "content_type": "text/plain",
            "content_encoding": "identity",
            "type": "order.v2",
            "app_id": "shop",
            "user_id": user,
            "x-other": "kept",
        }
        invalid = [
            {"priority": 256},
            {"priority": "high"},
            {"expiration": "-1"},
            {"expiration": "1.5"},
            {"correlation_id": "c" * 256},
            {"reply_to": 7},
            {"content_type": {"a": 1}},
            {"app_id": "é" * 200},
            {"user_id": user + "-not"},
        ]
        rows = [{"headers": valid}] + [{"headers": h} for h in invalid] + [{"event_type": "After"}]
        with psycopg.connect(outbox.dsn) as conn:
            ids = outbox.insert(conn, rows)
            conn.commit()
        await consumer.wait_for({ids[0], ids[-1]})
        assert consumer.ids() == [ids[0], ids[-1]]  # the stream went on past every bad row
        got = consumer.deliveries[0]
        for name, value in valid.items():
            if name == "x-other":
                assert got.headers[name] == value
            elif name == "expiration":  # aio-pika reads the wire's "600000" ms as seconds
                assert got.properties[name] == 600.0
            else:
                assert got.properties[name] == value, name
                assert name not in got.headers
        letters = dead_letters(outbox)
        assert list(letters) == ids[1:-1]
        expected = [
            "priority must be 0-255, got 256",
            "priority must be a non-negative integer",
            "expiration must be a non-negative integer",
            "expiration must be a non-negative integer",
            "correlation_id longer than 255 bytes",
            "reply_to must be a string",
            "content_type must be a string",
            "app_id longer than 255 bytes",
            "is not the connection's user",
        ]
        for row_id, needle in zip(ids[1:-1], expected, strict=True):
            assert needle in letters[row_id], letters[row_id]
    finally:
        await consumer.close()


@pytest.mark.asyncio
async def test_broker_closes_the_channel_for_a_foreign_user_id(amqp_url: str) -> None:
    """Why user_id is checked up front: RabbitMQ refuses the publish by closing the channel."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        message = aio_pika.Message(b"{}", user_id="somebody-else")
        with pytest.raises(ChannelPreconditionFailed, match="user_id"):
            await channel.default_exchange.publish(message, routing_key="nowhere")
    finally:
        await connection.close()


def test_init_creates_debezium_table(pg_dsn: str) -> None:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("dbzi"))
    setup.settings = dataclasses.replace(setup.settings, layout="debezium")
    try:
        lines = setup.init()
        assert f"table {setup.table}: created" in lines
        assert any("not created" in line and "_enqueue" in line for line in lines), lines
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            columns = conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
                " ORDER BY attnum",
                (setup.table,),
            ).fetchall()
        assert [c[0] for c in columns] == [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "timestamp",
            "tracingspancontext",
        ]
    finally:
        setup.cleanup()


@pytest.mark.parametrize(
    ("ddl", "options", "needle"),
    [
        (
            "id uuid, aggregatetype text, aggregateid text, type text",
            (),
            "lacks column payload for payload",
        ),
        (
            "id uuid, aggregatetype text, aggregateid text, type text, payload int",
            (),
            "column payload of outbox table",
        ),
        (
            "id uuid, aggregatetype text, aggregateid text, type text, payload jsonb,"
            " timestamp bigint",
            (),
            "column timestamp of outbox table",
        ),
        (
            "id uuid, aggregatetype text, aggregateid text, type text, payload jsonb",
            ("--header-column", "tenant_id:x-tenant"),
            "lacks column tenant_id for header x-tenant",
        ),
        (
            "id uuid, aggregatetype text, aggregateid text, type text, payload jsonb, prio float8",
            ("--column", "priority=prio"),
            "column prio of outbox table",
        ),
    ],
)
def test_init_no_table_refuses_what_cannot_work(
    pg_dsn: str, ddl: str, options: tuple[str, ...], needle: str
) -> None:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("dbzr"))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {setup.table} ({ddl})")
    try:
        result = run_cli(
            "init",
            *setup.cli_args("init"),
            "--no-table",
            "--no-exchange",
            "--layout",
            "debezium",
            *options,
        )
        assert result.returncode == 78, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    finally:
        setup.cleanup()


@pytest.mark.asyncio
async def test_resync_reads_through_the_mapping(
    debezium: Setup, watcher: PropertiesConsumer, relays: Any
) -> None:
    """Rows resync selects from the table become the same messages the stream made."""
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    span = f"traceparent={TRACEPARENT}"
    relay = relays(debezium, *MAPPING)
    relay.wait_for_log("streaming from slot")
    with psycopg.connect(debezium.dsn) as conn:
        streamed = debezium_insert(
            conn, debezium.table, tracingspancontext=span, tenant_id="acme", shard=1
        )
        conn.commit()
    await watcher.wait_for({streamed})
    assert relay.stop() == 0
    with psycopg.connect(debezium.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (debezium.names["slot"],))
    with psycopg.connect(debezium.dsn) as conn:
        missed = debezium_insert(
            conn, debezium.table, tracingspancontext=span, tenant_id="acme", shard=1
        )
        conn.commit()
    done = run_cli("resync", *debezium.cli_args("resync"), *MAPPING, "--since", since, timeout=180)
    assert done.returncode == 0, done.stderr
    await watcher.wait_for({missed})
    by_id = {d.message_id: d for d in watcher.deliveries}
    one, two = by_id[streamed], by_id[missed]
    assert two.body == one.body and two.routing_key == one.routing_key == "order.OrderCreated"
    assert two.headers == one.headers
    assert two.headers["x-tenant"] == "acme" and two.headers["shard"] == 1
    assert two.headers["traceparent"] == TRACEPARENT
    assert two.properties["correlation_id"] == one.properties["correlation_id"] == "42"


def test_init_refuses_a_column_mapping_without_the_table(pg_dsn: str) -> None:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("dbzm"))
    try:
        result = run_cli(
            "init", *setup.cli_args("init"), "--no-exchange", "--column", "event_type=kind"
        )
        assert result.returncode == 78, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "does not exist" in lines[0], result.stderr
        assert "init --no-table" in lines[0]
    finally:
        setup.cleanup()


@pytest.mark.asyncio
async def test_replay_publishes_a_mapped_row_as_the_stream_would(
    debezium: Setup, relays: Any
) -> None:
    """An unroutable Debezium row is dead-lettered with its header columns, trace context and
    mapped properties; once a queue is bound, replay publishes the same message."""
    relay = relays(debezium, *MAPPING)
    relay.wait_for_log("streaming from slot")
    with psycopg.connect(debezium.dsn) as conn:
        row_id = debezium_insert(
            conn,
            debezium.table,
            tracingspancontext=f"traceparent={TRACEPARENT}",
            tenant_id="acme",
            shard=3,
        )
        conn.commit()
    deadline = asyncio.get_running_loop().time() + 30
    while row_id not in dead_letters(debezium):  # no queue is bound yet: returned
        assert asyncio.get_running_loop().time() < deadline, relay.log_tail()
        await asyncio.sleep(0.2)
    assert (
        "unroutable" in dead_letters(debezium)[row_id].lower()
        or "NO_ROUTE" in (dead_letters(debezium)[row_id])
    )
    consumer = PropertiesConsumer(debezium.amqp_url, debezium.names["exchange"])
    await consumer.start()
    try:
        result = await asyncio.to_thread(
            run_cli, "dead-letters", "replay", *debezium.cli_args("dead-letters replay"), *MAPPING
        )
        assert result.returncode == 0, result.stderr
        await consumer.wait_for({row_id})
        got = consumer.deliveries[0]
        assert got.routing_key == "order.OrderCreated"
        assert got.headers["x-tenant"] == "acme" and got.headers["shard"] == 3
        assert got.headers["traceparent"] == TRACEPARENT
        assert got.properties["correlation_id"] == "42"
    finally:
        await consumer.close()


def test_run_validation_refuses_our_table_under_the_debezium_layout(
    pg_dsn: str, amqp_url: str
) -> None:
    """The relay's startup check reads the layout: init's table lacks Debezium's columns."""
    setup = Setup(pg_dsn, amqp_url, unique_names("dbzv"))
    setup.init()
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            with pytest.raises(ConfigError) as info:
                checks.validate(conn, dataclasses.replace(setup.settings, layout="debezium"))
            assert "lacks column aggregatetype for aggregate_type" in str(info.value)
            checks.validate(conn, setup.settings)
    finally:
        setup.cleanup()

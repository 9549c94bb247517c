"""CloudEvents end to end: rows, emitted messages, replayed dead letters and resynced rows, with
``--format cloudevents`` / ``cloudevents-structured`` to a real queue, read back with the
CloudEvents Python SDK's RabbitMQ binding (which validates each event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
import psycopg
import pytest
import pytest_asyncio
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.v1.event import CloudEvent

from cdc_relay.config import dsn_database
from cdc_relay.schema import function_names
from devtools.amqp import delete_topology
from tests.harness import Consumer, Delivery, Setup, run_cli, unique_names

pytestmark = pytest.mark.asyncio

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def outbox(pg_dsn: str, amqp_url: str) -> Iterator[Setup]:
    """An outbox with its emit function, so emitted messages go the same way."""
    setup = Setup(pg_dsn, amqp_url, unique_names("ce"))
    setup.init(emit=True)
    yield setup
    setup.cleanup()
    schema, _ = setup.settings.table_parts
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in function_names(setup.settings.table_parts):
            conn.execute(f"DROP FUNCTION IF EXISTS {schema}.{name}")


@pytest_asyncio.fixture
async def consumer(outbox: Setup) -> AsyncIterator[Consumer]:
    c = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
    yield c
    await c.close()


def read_event(delivery: Delivery) -> CloudEvent:
    """The delivery as a CloudEvents consumer reads it (binary or structured, by content_type)."""
    strings = {k: v for k, v in delivery.headers.items() if isinstance(v, str)}
    message = rabbitmq.RabbitMQMessage(
        headers=strings, content_type=delivery.properties["content_type"], body=delivery.body
    )
    return rabbitmq.from_rabbitmq_event(message)


def write(setup: Setup) -> tuple[list[str], dict[str, tuple[datetime, str]]]:
    """Two rows (one with trace context, one without an aggregate id) and an emitted message.

    Returns the ids in commit order, and per id its creation time and stored payload text.
    """
    emit_fn = f"{setup.settings.table_parts[0]}.{function_names(setup.settings.table_parts)[1]}"
    with psycopg.connect(setup.dsn) as conn:
        ids = setup.insert(
            conn,
            [
                {
                    "aggregate_id": 42,
                    "event_type": "OrderPaid",
                    "payload": {"total": 12.5, "items": ["a", "ü€"]},
                    "headers": {"traceparent": TRACEPARENT, "tracestate": "k=v", "tenant": "t1"},
                },
                {"aggregate_id": "", "event_type": "Tick", "payload": [1, 2]},
            ],
        )
        emitted = conn.execute(
            f"SELECT {emit_fn}('order', '7', 'Emitted', '{{\"e\": true}}'::jsonb)::text"
        ).fetchone()
        assert emitted is not None
        ids.append(emitted[0])
        now = conn.execute("SELECT now()").fetchone()
        assert now is not None
        stored = {
            id_: (created, payload)
            for id_, created, payload in conn.execute(
                f"SELECT id::text, created_at, payload::text FROM {setup.table}"
            )
        }
    stored[emitted[0]] = (now[0], '{"e": true}')
    return ids, stored


def check_events(
    deliveries: list[Delivery], ids: list[str], stored: dict[str, Any], source: str
) -> None:
    """Every attribute of the three events ``write`` made, as the SDK reads them."""
    by_id = {d.message_id: d for d in deliveries}
    events = {i: read_event(by_id[i]) for i in ids}
    for i, event in events.items():
        created, payload = stored[i]
        assert event.get_specversion() == "1.0"
        assert event.get_id() == i == by_id[i].message_id
        assert event.get_source() == source
        assert event.get_time() == created
        assert event.get_datacontenttype() == "application/json"
        assert event.get_data() == orjson.loads(payload)
    paid, tick, emitted = (events[i] for i in ids)
    assert (paid.get_type(), paid.get_subject()) == ("OrderPaid", "42")
    assert paid.get_extension("traceparent") == TRACEPARENT
    assert paid.get_extension("tracestate") == "k=v"
    assert paid.get_extension("tenant") == "t1"
    assert (tick.get_type(), tick.get_subject()) == ("Tick", None)
    assert tick.get_extension("traceparent") is None
    assert (emitted.get_type(), emitted.get_subject()) == ("Emitted", "7")
    # Routing and the plain headers are those of the event format.
    assert by_id[ids[0]].routing_key == "order.OrderPaid"
    assert by_id[ids[0]].headers["traceparent"] == TRACEPARENT
    assert by_id[ids[0]].headers["aggregate_type"] == "order"


async def test_binary_mode_rows_and_emitted_messages(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    relay = relays(outbox, "--format", "cloudevents")
    relay.wait_for_log("streaming from slot")
    ids, stored = write(outbox)
    await consumer.wait_for(set(ids), timeout=30)
    _, table = outbox.settings.table_parts
    source = f"/cdc-relay/{dsn_database(outbox.dsn)}/public.{table}"
    check_events(consumer.deliveries, ids, stored, source)
    first = next(d for d in consumer.deliveries if d.message_id == ids[0])
    assert first.body == stored[ids[0]][1].encode()  # the payload as stored, unchanged
    assert first.properties["content_type"] == "application/json"
    assert first.headers["ce-specversion"] == "1.0" and first.headers["ce-id"] == ids[0]
    assert first.headers["ce-time"].endswith("Z")


async def test_structured_mode_with_a_configured_source(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    relay = relays(outbox, "--format", "cloudevents-structured", "--ce-source", "urn:shop:orders")
    relay.wait_for_log("streaming from slot")
    ids, stored = write(outbox)
    await consumer.wait_for(set(ids), timeout=30)
    check_events(consumer.deliveries, ids, stored, "urn:shop:orders")
    first = next(d for d in consumer.deliveries if d.message_id == ids[0])
    assert first.properties["content_type"] == "application/cloudevents+json"
    # The payload text is the event's data byte for byte.
    assert first.body.endswith(b',"data":' + stored[ids[0]][1].encode() + b"}")
    assert not any(name.startswith("ce-") for name in first.headers)


async def test_a_row_cloudevents_cannot_carry_is_a_dead_letter_and_replay_uses_the_format(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    relay = relays(outbox, "--format", "cloudevents")
    relay.wait_for_log("streaming from slot")
    with psycopg.connect(outbox.dsn) as conn:
        bad, good = outbox.insert(
            conn,
            [{"headers": {"ce-source": "forged"}}, {"event_type": "After"}],
        )
    await consumer.wait_for({good}, timeout=30)
    assert bad not in consumer.ids()
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        reason = conn.execute(
            f"SELECT reason FROM {outbox.table}_dead_letter WHERE outbox_id = %s", (bad,)
        ).fetchone()
        # Fix the row's data as an operator would, then replay it as a structured event.
        conn.execute(
            f"UPDATE {outbox.table}_dead_letter SET row_data = jsonb_set(row_data, "
            "'{headers}', to_jsonb('{\"tenant\": \"t2\"}'::text)) WHERE outbox_id = %s",
            (bad,),
        )
    assert reason is not None and "CloudEvents attributes the relay writes" in reason[0]
    result = await asyncio.to_thread(
        run_cli,
        "dead-letters",
        "replay",
        *outbox.cli_args("dead-letters replay"),
        "--format",
        "cloudevents-structured",
        "--ce-source",
        "/replayed",
    )
    assert result.returncode == 0, result.stderr
    await consumer.wait_for({bad}, timeout=30)
    event = read_event(next(d for d in consumer.deliveries if d.message_id == bad))
    assert (event.get_id(), event.get_source(), event.get_type()) == (bad, "/replayed", "Created")
    assert event.get_extension("tenant") == "t2"


async def test_resync_publishes_the_lost_rows_as_cloudevents(
    outbox: Setup, consumer: Consumer
) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    with psycopg.connect(outbox.dsn) as conn:
        ids = outbox.insert(
            conn,
            [
                {
                    "aggregate_id": "a1",
                    "event_type": "Lost",
                    "headers": {"traceparent": TRACEPARENT},
                },
                {"aggregate_id": "a2", "event_type": "Lost", "payload": {"n": 2}},
            ],
        )
        created = dict(conn.execute(f"SELECT id::text, created_at FROM {outbox.table}").fetchall())
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (outbox.names["slot"],))
    done = await asyncio.to_thread(
        run_cli,
        "resync",
        *outbox.cli_args("resync"),
        "--since",
        since,
        "--format",
        "cloudevents",
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    await consumer.wait_for(set(ids), timeout=30)
    by_id = {d.message_id: read_event(d) for d in consumer.deliveries}
    _, table = outbox.settings.table_parts
    for i, subject in zip(ids, ("a1", "a2"), strict=True):
        event = by_id[i]
        assert (event.get_id(), event.get_type(), event.get_subject()) == (i, "Lost", subject)
        assert event.get_source() == f"/cdc-relay/{dsn_database(outbox.dsn)}/public.{table}"
        assert event.get_time() == created[i]
    assert by_id[ids[0]].get_extension("traceparent") == TRACEPARENT
    assert by_id[ids[1]].get_data() == {"n": 2}


async def exchange_exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return True
    finally:
        await connection.close()


async def test_init_and_run_declare_the_exchange_as_for_events(outbox: Setup, relays: Any) -> None:
    exchange = outbox.names["exchange"]
    assert not await exchange_exists(outbox.amqp_url, exchange)
    init = await asyncio.to_thread(
        run_cli, "init", *outbox.cli_args("init"), "--format", "cloudevents"
    )
    assert init.returncode == 0, init.stderr
    assert await exchange_exists(outbox.amqp_url, exchange)
    await delete_topology(outbox.amqp_url, None, exchange)
    assert not await exchange_exists(outbox.amqp_url, exchange)
    relay = relays(outbox, "--format", "cloudevents-structured")
    relay.wait_for_log("streaming from slot")
    assert await exchange_exists(outbox.amqp_url, exchange)

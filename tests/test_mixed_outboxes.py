"""The three parts together, against real servers: one slot, one relay file, outboxes of
different layouts and formats.

A Debezium outbox table (with a tenant column its app places in a header) relayed as
binary CloudEvents, our own layout as plain events, and our layout again as structured
CloudEvents: rows written in interleaved app transactions reach each table's exchange in
that table's shape and commit order, a row its table's mapping cannot read is a dead
letter in that table's dead-letter table while the others flow, and ``init``/``status``
with ``--config`` handle each layout.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.v1.event import CloudEvent

from cdc_relay.config import dsn_database
from cdc_relay.errors import EX_CONFIG
from cdc_relay.layout import DEBEZIUM_COLUMNS
from tests.harness import Consumer, Delivery, RelayProcess, Setup, run_cli, unique_names

pytestmark = pytest.mark.asyncio

# Debezium's documented outbox table as its users have it, plus a tenant column.
DEBEZIUM_DDL = """CREATE TABLE {table} (
    id uuid NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    timestamp timestamptz NOT NULL DEFAULT now(),
    payload jsonb,
    tracingspancontext varchar(256),
    tenant_id text
)"""
ROUNDS = 20  # app transactions, each writing to every table


class PropertiesConsumer(Consumer):
    """Also keeps the per-row AMQP properties a mapped header sets."""

    def record(self, message: AbstractIncomingMessage) -> None:
        super().record(message)
        props = self.deliveries[-1].properties
        props.update(correlation_id=message.correlation_id, priority=message.priority)


class Mixed:
    """A relay file of three outboxes on one slot: Debezium in CloudEvents first (the
    issue's example), then our layout as events, then as structured CloudEvents."""

    def __init__(self, dsn: str, amqp_url: str, path: Path, *, header_columns: bool = True):
        shared = unique_names("mix")
        self.setups: list[Setup] = []
        for letter in "dec":
            names = unique_names(f"x{letter}")
            names.update(slot=shared["slot"], publication=shared["publication"])
            self.setups.append(Setup(dsn, amqp_url, names))
        self.debezium, self.events, self.structured = self.setups
        self.dsn, self.path, self.slot = dsn, path, shared["slot"]
        mapping = ['header_columns = ["tenant_id:x-tenant"]'] if header_columns else []
        per_outbox = [
            ['layout = "debezium"', 'format = "cloudevents"', *mapping],
            [],
            ['format = "cloudevents-structured"', 'ce_source = "urn:shop:billing"'],
        ]
        lines = [
            f"dsn = {orjson.dumps(dsn).decode()}",
            f"amqp_url = [{orjson.dumps(amqp_url).decode()}]",
            f'slot = "{self.slot}"',
            f'publication = "{shared["publication"]}"',
        ]
        for setup, own in zip(self.setups, per_outbox, strict=True):
            lines += ["", "[[outbox]]", f'table = "{setup.table}"']
            lines += [f'exchange = "{setup.names["exchange"]}"', *own]
        path.write_text("\n".join(lines) + "\n")

    def cli(self, command: str, *args: str) -> Any:
        return run_cli(command, "--config", str(self.path), *args)

    def create_debezium_table(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(DEBEZIUM_DDL.format(table=self.debezium.table))

    def exists(self, setup: Setup) -> bool:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute("SELECT to_regclass(%s)", (setup.table,)).fetchone() != (None,)

    def cleanup(self) -> None:
        for setup in self.setups:
            setup.cleanup()


class FileRelay(RelayProcess):
    """``cdc-relay run --config FILE``: every setting comes from the file."""

    def __init__(self, mixed: Mixed, log_path: Path) -> None:
        self.config = mixed.path
        super().__init__(mixed.debezium, log_path)

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "cdc_relay.cli", "--log-level", self.log_level]
        return [*args, "run", "--config", str(self.config), "--stats-interval", "2"]


@pytest.fixture
def mixed(pg_dsn: str, amqp_url: str, tmp_path: Path) -> Iterator[Mixed]:
    setup = Mixed(pg_dsn, amqp_url, tmp_path / "relay.toml")
    yield setup
    setup.cleanup()


@pytest.fixture
def file_relay(tmp_path: Path) -> Iterator[Callable[[Mixed], FileRelay]]:
    started: list[FileRelay] = []

    def start(mixed: Mixed) -> FileRelay:
        relay = FileRelay(mixed, tmp_path / f"relay-{len(started)}.log").start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop_quietly()
        print(f"--- {relay.log_path.name} ---\n{relay.log_tail(6000)}")


@pytest_asyncio.fixture
async def consumers(mixed: Mixed) -> AsyncIterator[list[PropertiesConsumer]]:
    started = [
        await PropertiesConsumer(s.amqp_url, s.names["exchange"]).start() for s in mixed.setups
    ]
    yield started
    for consumer in started:
        await consumer.close()


def debezium_insert(conn: psycopg.Connection[Any], table: str, n: int, **row: Any) -> str:
    """An INSERT the way Debezium's users write one: their columns, their values."""
    row_id = str(uuid.uuid4())
    conn.execute(
        f"INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, tenant_id)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            row_id,
            "order",
            str(n),
            "OrderCreated",
            row.get("payload", orjson.dumps({"n": n}).decode()),
            row.get("tenant_id", f"t{n % 3}"),
        ),
    )
    return row_id


def read_event(delivery: Delivery) -> CloudEvent:
    """The delivery as a CloudEvents consumer reads it (binary or structured, by content_type)."""
    strings = {k: v for k, v in delivery.headers.items() if isinstance(v, str)}
    message = rabbitmq.RabbitMQMessage(
        headers=strings, content_type=delivery.properties["content_type"], body=delivery.body
    )
    return rabbitmq.from_rabbitmq_event(message)


def dead_letters(setup: Setup) -> dict[str | None, str]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT outbox_id, reason FROM {setup.table}_dead_letter ORDER BY id"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def table_columns(dsn: str, table: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (table,),
        ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def unmapped(pg_dsn: str, amqp_url: str, tmp_path: Path) -> Iterator[Mixed]:
    """The same file with Debezium's own columns only (no header column)."""
    setup = Mixed(pg_dsn, amqp_url, tmp_path / "relay.toml", header_columns=False)
    yield setup
    setup.cleanup()


async def test_init_creates_each_layout_and_status_lists_every_table(unmapped: Mixed) -> None:
    """Without header columns, init --config creates the Debezium table itself."""
    mixed = unmapped
    printed = mixed.cli("init", "--print-sql", "--no-inbox")
    assert printed.returncode == 0, printed.stderr
    scripts = printed.stdout.split("-- Generated by `cdc-relay init --print-sql`")[1:]
    assert [s.split("\n", 1)[0] for s in scripts] == [
        f" for --table {s.table}; do not edit." for s in mixed.setups
    ]
    debezium_sql, events_sql, structured_sql = scripts
    assert "Debezium's Outbox Event Router" in debezium_sql
    assert "aggregatetype" in debezium_sql and "_enqueue" not in debezium_sql
    for ours in (events_sql, structured_sql):
        assert "aggregate_type text NOT NULL" in ours and "aggregatetype" not in ours
        assert '_enqueue"(' in ours

    init = mixed.cli("init", "--no-inbox")
    assert init.returncode == 0, init.stderr
    debezium = mixed.debezium.table
    assert f"table {debezium}: created" in init.stdout
    assert f"table {debezium}: its columns fit --layout debezium" in init.stdout
    assert f"function {debezium.split('.')[1]}_enqueue: not created" in init.stdout
    assert table_columns(mixed.dsn, debezium) == [c for _, c in DEBEZIUM_COLUMNS]
    for setup in mixed.setups:
        assert f"dead-letter table {setup.table}_dead_letter: created" in init.stdout
        assert f"exchange {setup.names['exchange']}: created" in init.stdout
    for ours in (mixed.events, mixed.structured):
        assert f"table {ours.table}: created" in init.stdout
        assert "aggregate_type" in table_columns(mixed.dsn, ours.table)
    assert f"replication slot {mixed.slot}: created" in init.stdout
    again = mixed.cli("init", "--no-inbox")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout

    status = mixed.cli("status", "--json", "--no-require-active")
    assert status.returncode == 0, (status.stdout, status.stderr)
    fields = orjson.loads(status.stdout)
    assert [t["table"] for t in fields["tables"]] == [s.table for s in mixed.setups]
    assert all(t["in_publication"] and t["dead_letter_table_exists"] for t in fields["tables"])
    text = mixed.cli("status", "--no-require-active")
    assert "outbox tables:        3" in text.stdout, text.stdout


async def test_init_refuses_a_debezium_table_with_columns_it_cannot_create(mixed: Mixed) -> None:
    """init creates only Debezium's own columns: with header_columns, the table is the user's."""
    refused = mixed.cli("init", "--no-inbox")
    assert refused.returncode == EX_CONFIG, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and mixed.debezium.table in lines[0], lines
    assert "does not exist: create it" in lines[0]
    assert not mixed.exists(mixed.debezium)  # not a half-made table the relay would refuse
    mixed.create_debezium_table()
    init = mixed.cli("init", "--no-inbox")
    assert init.returncode == 0, init.stderr
    assert f"table {mixed.debezium.table}: already exists" in init.stdout
    assert f"table {mixed.debezium.table}: its columns fit --layout debezium" in init.stdout


async def test_three_layouts_and_formats_on_one_slot(
    mixed: Mixed, consumers: list[PropertiesConsumer], file_relay: Any
) -> None:
    mixed.create_debezium_table()
    init = mixed.cli("init", "--no-inbox")
    assert init.returncode == 0, init.stderr
    relay = file_relay(mixed)
    await relay.wait_for_log_async("streaming from slot", timeout=60)
    ids: list[list[str]] = [[], [], []]
    bad: list[str] = []
    with psycopg.connect(mixed.dsn) as conn:
        for n in range(ROUNDS):  # app transactions writing to all three, interleaved
            ids[1] += mixed.events.insert(
                conn, [{"aggregate_id": n, "payload": {"n": n}, "headers": {"priority": n % 10}}]
            )
            ids[0].append(debezium_insert(conn, mixed.debezium.table, n))
            ids[2] += mixed.structured.insert(
                conn, [{"aggregate_id": n, "event_type": "Billed", "payload": {"n": n}}]
            )
            if n == ROUNDS // 2:  # one row each table's mapping cannot read
                bad.append(debezium_insert(conn, mixed.debezium.table, n, payload=None))
                bad += mixed.events.insert(conn, [{"headers": {"priority": 256}}])
                bad += mixed.structured.insert(conn, [{"headers": {"correlation_id": "c" * 256}}])
            conn.commit()
        stored = {
            row[0]: row[1:]
            for row in conn.execute(
                f"SELECT id::text, timestamp, payload::text FROM {mixed.debezium.table}"
            )
        }
    for consumer, expected in zip(consumers, ids, strict=True):
        await consumer.wait_for(set(expected), timeout=60)
    for consumer in consumers:
        await consumer.settle(quiet=0.5)
    for consumer, expected in zip(consumers, ids, strict=True):
        assert consumer.ids() == expected  # its own rows only, each once, in commit order

    database = dsn_database(mixed.dsn)
    for n, delivery in enumerate(consumers[0].deliveries):  # Debezium, binary CloudEvents
        event = read_event(delivery)
        created, payload = stored[delivery.message_id]
        assert event.get_specversion() == "1.0"
        assert event.get_id() == delivery.message_id
        assert event.get_source() == f"/cdc-relay/{database}/{mixed.debezium.table}"
        assert (event.get_type(), event.get_subject()) == ("OrderCreated", str(n))
        assert event.get_time() == created.astimezone(UTC)
        assert event.get_datacontenttype() == "application/json"
        assert event.get_data() == {"n": n} == orjson.loads(payload)
        assert delivery.body == payload.encode()  # the payload as stored, unchanged
        assert delivery.headers["x-tenant"] == f"t{n % 3}"
        assert delivery.headers["ce-id"] == delivery.message_id
        assert delivery.routing_key == "order.OrderCreated"
        assert delivery.properties["content_type"] == "application/json"
    for n, delivery in enumerate(consumers[1].deliveries):  # our layout, plain events
        assert orjson.loads(delivery.body) == {"n": n}
        assert delivery.properties["priority"] == n % 10
        assert delivery.headers["aggregate_id"] == str(n)
        assert not any(k.startswith("ce-") for k in delivery.headers)
        assert delivery.routing_key == "order.Created"
    for n, delivery in enumerate(consumers[2].deliveries):  # our layout, structured
        assert delivery.properties["content_type"] == "application/cloudevents+json"
        event = read_event(delivery)
        assert event.get_id() == delivery.message_id
        assert event.get_source() == "urn:shop:billing"
        assert (event.get_type(), event.get_subject()) == ("Billed", str(n))
        assert isinstance(event.get_time(), datetime)
        assert event.get_data() == {"n": n}

    letters = [dead_letters(setup) for setup in mixed.setups]
    assert [list(d) for d in letters] == [[i] for i in bad]  # each in its own table
    assert "column payload is NULL" in letters[0][bad[0]]
    assert "priority must be 0-" in letters[1][bad[1]]
    assert "correlation_id" in letters[2][bad[2]]

    status = mixed.cli("status", "--json")
    assert status.returncode in (0, 1), status.stderr
    fields = orjson.loads(status.stdout)
    pending = {t["table"]: t["dead_letters_pending"] for t in fields["tables"]}
    assert pending == {s.table: 1 for s in mixed.setups}
    assert fields["dead_letters_pending"] == 3
    assert relay.terminate() == 0

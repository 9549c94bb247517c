"""The relay end to end against real Postgres and RabbitMQ (issue: core relay)."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

import orjson
import psycopg
import pytest

from cdc_relay import accel
from devtools.servers import free_port
from tests.harness import (
    Consumer,
    Setup,
    metrics_text,
    parse_histogram,
    wait_until,
)

pytestmark = pytest.mark.asyncio


async def test_message_mapping(outbox: Setup, consumer: Consumer, relays: Any) -> None:
    relay = relays(outbox)
    relay.wait_for_log("streaming from slot")
    # The startup line says which hot path runs (the same rule decides in this process).
    assert f"; hot path: {accel.implementation()}" in relay.log()
    other_exchange = outbox.names["exchange"] + "_other"
    other = await Consumer(outbox.amqp_url, other_exchange).start()
    try:
        with psycopg.connect(outbox.dsn) as conn:
            ids = outbox.insert(
                conn,
                [
                    {
                        "aggregate_type": "order",
                        "aggregate_id": 42,
                        "event_type": "OrderCreated",
                        "payload": {"total": 12.5, "items": ["a", "ü€"]},
                        "headers": {"tenant": "acme", "n": 3},
                    },
                    {"event_type": "Custom", "routing_key": "special.key"},
                    {"event_type": "Elsewhere", "exchange": other_exchange},
                ],
            )
            created = conn.execute(
                f"SELECT created_at FROM {outbox.table} WHERE id = %s", (ids[0],)
            ).fetchone()
            stored = conn.execute(
                f"SELECT payload::text FROM {outbox.table} WHERE id = %s", (ids[0],)
            ).fetchone()
        assert created is not None and stored is not None
        await consumer.wait_for({ids[0], ids[1]})
        await other.wait_for({ids[2]})
        by_id = {d.message_id: d for d in consumer.deliveries}
        first = by_id[ids[0]]
        assert first.body == stored[0].encode()
        assert orjson.loads(first.body) == {"total": 12.5, "items": ["a", "ü€"]}
        assert first.routing_key == "order.OrderCreated"
        assert first.properties["content_type"] == "application/json"
        assert first.properties["delivery_mode"] == 2
        assert first.properties["type"] == "OrderCreated"
        assert first.properties["app_id"] == "cdc-relay"
        assert int(first.properties["timestamp"].timestamp()) == int(created[0].timestamp())
        assert first.headers == {
            "tenant": "acme",
            "n": 3,
            "aggregate_type": "order",
            "aggregate_id": "42",
            "event_type": "OrderCreated",
        }
        assert by_id[ids[1]].routing_key == "special.key"
        assert ids[2] not in by_id
        assert other.deliveries[0].routing_key == "order.Elsewhere"
    finally:
        await other.close()


async def test_routing_key_template(outbox: Setup, consumer: Consumer, relays: Any) -> None:
    relay = relays(outbox, "--routing-key", "evt.{aggregate_type}.{aggregate_id}")
    relay.wait_for_log("streaming from slot")
    with psycopg.connect(outbox.dsn) as conn:
        ids = outbox.insert(conn, [{"aggregate_type": "invoice", "aggregate_id": 7}])
    await consumer.wait_for(set(ids))
    assert consumer.deliveries[0].routing_key == "evt.invoice.7"


def _writer(setup: Setup, writer: int, plan: list[int], rollback_every: int) -> list[str]:
    """Insert transactions of the given sizes; every rollback_every-th one rolls back."""
    committed: list[str] = []
    seq = 0
    with psycopg.connect(setup.dsn) as conn:
        for n, size in enumerate(plan):
            rows = []
            for _ in range(size):
                rows.append(
                    {
                        "aggregate_type": f"w{writer}",
                        "aggregate_id": writer,
                        "payload": {"writer": writer, "seq": seq, "pad": "x" * 100},
                    }
                )
                seq += 1
            ids = setup.insert(conn, rows)
            if rollback_every and n % rollback_every == rollback_every - 1:
                conn.rollback()
            else:
                conn.commit()
                committed.extend(ids)
    return committed


async def test_concurrent_writers_all_arrive_once_in_order(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    relay = relays(outbox)
    relay.wait_for_log("streaming from slot")
    plans = [
        [1] * 1500,  # single-row transactions
        [10] * 250,  # multi-row transactions
        [5000],  # one big transaction
        [1, 7, 50] * 20,  # mixed
    ]
    rollback = [97, 7, 0, 5]
    results = await asyncio.gather(
        *(asyncio.to_thread(_writer, outbox, w, plan, rollback[w]) for w, plan in enumerate(plans))
    )
    committed = [i for ids in results for i in ids]
    total_inserted = sum(sum(p) for p in plans)
    assert total_inserted >= 10_000
    await consumer.wait_for(set(committed), timeout=120)
    await consumer.settle(quiet=1.0)
    counts = collections.Counter(consumer.ids())
    assert set(counts) == set(committed), "a rolled-back row arrived"
    assert max(counts.values()) == 1, "duplicates without any failure"
    # Per-writer order: seq increases along the deliveries of each writer.
    last: dict[int, int] = {}
    for delivery in consumer.deliveries:
        body = orjson.loads(delivery.body)
        assert body["seq"] > last.get(body["writer"], -1)
        last[body["writer"]] = body["seq"]
    assert await wait_until(lambda: outbox.confirmed_lag() < 64 * 1024, 15)


def _background_writer(setup: Setup, stop: threading.Event, ids: list[str]) -> None:
    with psycopg.connect(setup.dsn) as conn:
        n = 0
        while not stop.is_set() and n < 20_000:
            ids.extend(setup.insert(conn, [{"aggregate_id": n, "payload": {"n": n}}] * 3))
            conn.commit()
            n += 1
            time.sleep(0.001)


async def test_sigterm_then_restart_loses_and_replays_nothing(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    stop = threading.Event()
    ids: list[str] = []
    writer = threading.Thread(target=_background_writer, args=(outbox, stop, ids))
    writer.start()
    try:
        for round_ in range(3):
            relay = relays(outbox, name=f"round{round_}")
            relay.wait_for_log("streaming from slot")
            await asyncio.sleep(1.0)
            assert await asyncio.to_thread(relay.terminate) == 0
            assert "stopped; confirmed position" in relay.log()
    finally:
        stop.set()
        writer.join()
    relay = relays(outbox, name="final")
    await consumer.wait_for(set(ids), timeout=60)
    await consumer.settle(quiet=1.5)
    counts = collections.Counter(consumer.ids())
    assert len(ids) > 100
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, f"{sum(c - 1 for c in counts.values())} replayed"
    relay.terminate()


async def test_kill_9_mid_stream_loses_nothing(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    window = 200
    stop = threading.Event()
    ids: list[str] = []
    writer = threading.Thread(target=_background_writer, args=(outbox, stop, ids))
    writer.start()
    try:
        for round_ in range(3):
            relay = relays(outbox, "--max-in-flight", str(window), name=f"round{round_}")
            relay.wait_for_log("streaming from slot")
            await asyncio.sleep(0.7)
            relay.kill()
    finally:
        stop.set()
        writer.join()
    relay = relays(outbox, "--max-in-flight", str(window), name="final")
    await consumer.wait_for(set(ids), timeout=60)
    await consumer.settle(quiet=1.5)
    counts = collections.Counter(consumer.ids())
    assert set(counts) == set(ids)
    duplicates = sum(c - 1 for c in counts.values())
    # Each kill may replay what was in flight plus what was confirmed since the
    # last status update (at most STATUS_MIN_GAP later), rounded up per txn.
    assert duplicates <= 3 * (window + 3 * 50), duplicates
    print(f"kill -9 x3: {len(ids)} rows, {duplicates} duplicates")
    relay.terminate()


async def test_idle_outbox_does_not_pin_wal(outbox: Setup, relays: Any) -> None:
    relay = relays(outbox)
    relay.wait_for_log("streaming from slot")
    other = f"{outbox.table}_busy"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {other} (id bigserial primary key, data text)")
        try:
            for _ in range(40):
                conn.execute(
                    f"INSERT INTO {other} (data)"
                    " SELECT repeat('x', 500) FROM generate_series(1, 200)"
                )
            written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            assert written is not None
            ok = await wait_until(lambda: outbox.confirmed_lag() < 1024 * 1024, 15)
            assert ok, f"lag still {outbox.confirmed_lag()} bytes"
        finally:
            conn.execute(f"DROP TABLE {other}")


async def test_second_relay_is_hot_standby(outbox: Setup, consumer: Consumer, relays: Any) -> None:
    first = relays(outbox, name="first")
    first.wait_for_log("streaming from slot")
    second = relays(outbox, name="second")
    second.wait_for_log("standing by")
    with psycopg.connect(outbox.dsn) as conn:
        before = outbox.insert(conn, [{"payload": {"i": i}} for i in range(50)])
        conn.commit()
    await consumer.wait_for(set(before))
    first.kill()
    with psycopg.connect(outbox.dsn) as conn:
        after = outbox.insert(conn, [{"payload": {"i": i}} for i in range(50)])
        conn.commit()
    await consumer.wait_for(set(after), timeout=60)
    assert "streaming from slot" in second.log()
    assert set(before) | set(after) <= set(consumer.ids())
    assert second.terminate() == 0


async def test_commit_to_confirm_latency_per_transaction(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    """Under uvloop too: one observation per transaction with outbox rows, from its commit."""
    port = free_port()
    with psycopg.connect(outbox.dsn) as conn:  # a backlog, committed before the relay runs
        early = outbox.insert(conn, [{"aggregate_id": 1}])
        conn.commit()
        early += outbox.insert(conn, [{"aggregate_id": 2}, {"aggregate_id": 3}])
        conn.commit()
    await asyncio.sleep(1.2)
    relay = relays(outbox, "--event-loop", "uvloop", "--metrics-port", str(port))
    relay.wait_for_log("streaming from slot")
    await consumer.wait_for(set(early))
    with psycopg.connect(outbox.dsn) as conn:
        late = []
        for n in (1, 5, 1):
            late += outbox.insert(conn, [{"aggregate_id": 10 + i} for i in range(n)])
            conn.commit()
    await consumer.wait_for(set(late))
    histogram: dict[str, float] = {}
    for _ in range(50):  # the confirm may land just after the consumer saw the message
        histogram = parse_histogram(await metrics_text(port), "cdc_relay_commit_to_confirm_seconds")
        if histogram.get("count") == 5:
            break
        await asyncio.sleep(0.1)
    assert histogram["count"] == 5, histogram  # 5 transactions, not 9 messages
    # The two backlog transactions waited at least 1.2 s before the relay ran.
    assert histogram["1.0"] <= 3, histogram
    assert histogram["+Inf"] == 5
    assert histogram["sum"] >= 2 * 1.2
    relay.terminate()

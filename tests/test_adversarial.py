"""Issue 9 against real servers: DDL while streaming, poison rows, bursts, locks, stops.

Each test here failed on the relay before the session core and the publisher
were rebuilt (the rename lost a row silently; poison rows crash-looped or
retried forever; a burst of returns opened one connection per row; a second
SIGTERM was ignored).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness import Consumer, Setup, wait_until
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]


def dead_letters(setup: Setup) -> list[tuple[str | None, str]]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT outbox_id::text, reason FROM {setup.table}_dead_letter ORDER BY id"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def relay_backends(setup: Setup) -> set[int]:
    """Backend pids of every connection the relays of this test have open right now."""
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'cdc-relay%'"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return {r[0] for r in rows}


async def test_a_renamed_or_moved_outbox_loses_no_row(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    schema, table = outbox.table.split(".")
    ids: list[str] = []
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        ids += outbox.insert(conn, [{"event_type": "Before"}])
        conn.execute(f"ALTER TABLE {outbox.table} RENAME TO {table}_tmp")
        renamed = Setup(outbox.dsn, outbox.amqp_url, {**outbox.names, "table": f"{table}_tmp"})
        ids += renamed.insert(conn, [{"event_type": "WhileRenamed"}])
        conn.execute(f"ALTER TABLE {schema}.{table}_tmp RENAME TO {table}")
        conn.execute("CREATE SCHEMA IF NOT EXISTS adv_elsewhere")
        conn.execute(f"ALTER TABLE {outbox.table} SET SCHEMA adv_elsewhere")
        moved = Setup(
            outbox.dsn, outbox.amqp_url, {**outbox.names, "table": f"adv_elsewhere.{table}"}
        )
        ids += moved.insert(conn, [{"event_type": "WhileMoved"}])
        conn.execute(f"ALTER TABLE adv_elsewhere.{table} SET SCHEMA {schema}")
        ids += outbox.insert(conn, [{"event_type": "After"}])
    await consumer.wait_for(set(ids), timeout=30)
    assert [d.message_id for d in consumer.deliveries if d.message_id in ids] == ids
    assert dead_letters(outbox) == []


async def test_column_ddl_while_streaming_loses_no_row_and_never_blocks(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    """ADD/DROP/ALTER COLUMN on the outbox while streaming, even of a required column.

    pgoutput describes each row with the columns the table had when it was
    written, for ever: ending the session on a row written while a required
    column was gone would replay the same description on every restart, even
    after the column is back. Such rows are dead letters; the stream goes on.
    """
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    delivered: list[str] = []
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        delivered += outbox.insert(conn, [{"event_type": "Before"}])
        conn.execute(f"ALTER TABLE {outbox.table} ADD COLUMN note text DEFAULT 'n'")
        delivered += outbox.insert(conn, [{"event_type": "WithExtraColumn"}])
        conn.execute(f"ALTER TABLE {outbox.table} ALTER COLUMN event_type TYPE varchar(200)")
        delivered += outbox.insert(conn, [{"event_type": "AfterTypeChange"}])
        conn.execute(f"ALTER TABLE {outbox.table} DROP COLUMN note, DROP COLUMN headers")
        delivered += [
            str(row[0])
            for row in conn.execute(
                f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload)"
                " VALUES ('order', '1', 'WithoutHeaders', '{}') RETURNING id"
            ).fetchall()
        ]
        conn.execute(f"ALTER TABLE {outbox.table} DROP COLUMN event_type")
        [orphan] = [
            str(row[0])
            for row in conn.execute(
                f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, payload)"
                " VALUES ('order', '1', '{}') RETURNING id"
            ).fetchall()
        ]
        conn.execute(f"ALTER TABLE {outbox.table} ADD COLUMN event_type text NOT NULL DEFAULT 'x'")
        conn.execute(f"ALTER TABLE {outbox.table} ADD COLUMN headers jsonb NOT NULL DEFAULT '{{}}'")
        delivered += outbox.insert(conn, [{"event_type": "AfterRepair"}])
    await consumer.wait_for(set(delivered), timeout=30)
    assert [d.message_id for d in consumer.deliveries if d.message_id in delivered] == delivered
    assert await wait_until(lambda: len(dead_letters(outbox)) >= 1, 15), relay.log_tail()
    [(letter_id, reason)] = dead_letters(outbox)
    assert letter_id == orphan, (letter_id, orphan)
    assert "event_type" in reason, reason
    assert relay.proc is not None and relay.proc.poll() is None, relay.log_tail()
    assert "Traceback" not in relay.log()


async def test_poison_rows_are_dead_lettered_and_the_stream_goes_on(
    outbox: Setup, relays: Any
) -> None:
    relay = relays(outbox, "--max-message-size", "100000")
    await relay.wait_for_log_async("streaming from slot")
    deep: Any = "bottom"
    for _ in range(200):
        deep = {"d": deep}
    poison = [
        {"event_type": "DeepHeaders", "headers": {"deep": deep}},
        {"event_type": "HugeHeader", "headers": {"big": "x" * 200_000}},
        {"event_type": "MissingExchange", "exchange": outbox.names["exchange"] + "_missing"},
        {"event_type": "TooBig", "payload": {"blob": "y" * 150_000}},
        {"event_type": "Unroutable", "routing_key": "nobody.listens"},
    ]
    expected_good: list[str] = []
    poisoned: list[str] = []
    # A consumer bound only to what good rows use, so "Unroutable" has no queue.
    good_consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"], "order.#").start()
    try:
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            for bad in poison:
                [bad_id] = outbox.insert(conn, [bad])
                poisoned.append(bad_id)
                expected_good += outbox.insert(conn, [{"event_type": f"After{bad['event_type']}"}])
        await good_consumer.wait_for(set(expected_good), timeout=60)
        # at least once: a session that ends may store a dead letter again on replay
        assert await wait_until(
            lambda: {i for i, _ in dead_letters(outbox)} == set(poisoned), 30
        ), (poisoned, dead_letters(outbox), relay.log()[-6000:])
        letters = dict(dead_letters(outbox))
        assert set(letters) == set(poisoned)
        reasons = [letters[i] for i in poisoned]
        assert "deep" in reasons[0].lower() or "nest" in reasons[0].lower()
        assert "missing" in reasons[2]
        assert "exceeds" in reasons[3]
        assert "312" in reasons[4] or "NO_ROUTE" in reasons[4]
        assert not set(poisoned) & {d.message_id for d in good_consumer.deliveries}
        assert relay.proc is not None and relay.proc.poll() is None
        assert await wait_until(lambda: outbox.confirmed_lag() < 1_000_000, 20)
    finally:
        await good_consumer.close()


async def test_a_burst_of_unroutable_rows_uses_one_dead_letter_connection(
    outbox: Setup, relays: Any
) -> None:
    relay = relays(outbox)  # no queue bound: every row is returned by the broker
    await relay.wait_for_log_async("streaming from slot")
    before = relay_backends(outbox)
    seen: set[int] = set(before)
    with psycopg.connect(outbox.dsn) as conn:
        outbox.insert(conn, [{"event_type": "Burst", "aggregate_id": i} for i in range(5000)])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(dead_letters(outbox)) < 5000:
        seen |= relay_backends(outbox)
        await asyncio.sleep(0.2)
    assert len(dead_letters(outbox)) == 5000
    # replication + dead-letter writer (+ a validation connection that came and went)
    assert len(seen) <= 4, f"relay opened {len(seen)} Postgres connections"
    rss_kb = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{relay.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
    )
    print(f"5,000 unroutable rows: {len(seen)} relay connections, peak RSS {rss_kb // 1024} MB")
    assert rss_kb < 300 * 1024


async def test_a_lock_on_the_dead_letter_table_fails_in_bounded_time_then_recovers(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    relay = relays(outbox, "--max-message-size", "1000")
    await relay.wait_for_log_async("streaming from slot")
    with psycopg.connect(outbox.dsn) as locker:
        locker.execute(f"LOCK TABLE {outbox.table}_dead_letter IN ACCESS EXCLUSIVE MODE")
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            [bad] = outbox.insert(conn, [{"event_type": "TooBig", "payload": {"x": "y" * 2000}}])
        await relay.wait_for_log_async("cannot store dead letters", timeout=40)
        locker.rollback()
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        [good] = outbox.insert(conn, [{"event_type": "AfterLock"}])
    await consumer.wait_for({good}, timeout=60)
    assert await wait_until(lambda: [i for i, _ in dead_letters(outbox)] == [bad], 30)


async def test_a_hot_standby_waits_on_one_connection(outbox: Setup, relays: Any) -> None:
    active = relays(outbox, name="active")
    await active.wait_for_log_async("streaming from slot")

    def drift_check_open() -> bool:
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'cdc-relay drift check'"
            ).fetchone()
        return row is not None and row[0] > 0

    # The active relay's side connections are all open once its first drift check ran
    # (a few seconds in); its validation connection has come and gone by then.
    assert await wait_until(drift_check_open, 20), active.log_tail()
    await asyncio.sleep(0.5)
    active_backends = relay_backends(outbox)
    standby = relays(outbox, name="standby")
    await standby.wait_for_log_async("standing by")
    # Its replication connection and the slot poller's side connection (the standby
    # keeps the slot metrics current), each opened once: no connection churn.
    seen: set[int] = set()
    for _ in range(25):
        seen |= relay_backends(outbox) - active_backends
        await asyncio.sleep(0.2)
    assert len(seen) <= 2, f"the standby used {len(seen)} connections in 5 s"
    active.kill()
    await standby.wait_for_log_async("taking over", timeout=30)
    await standby.wait_for_log_async("streaming from slot", timeout=30)


async def test_a_second_sigterm_stops_at_once(outbox: Setup, relays: Any) -> None:
    """The first SIGTERM waits for confirms (up to --shutdown-timeout); the second does not."""
    proxy = await TcpProxy(
        "127.0.0.1", int(outbox.amqp_url.rsplit(":", 1)[1].split("/")[0])
    ).start()
    try:
        url = outbox.amqp_url.replace(f":{proxy.target[1]}/", f":{proxy.port}/")
        proxied = Setup(outbox.dsn, url, outbox.names)  # the same outbox, via the proxy
        relay = relays(
            proxied, "--shutdown-timeout", "120", "--confirm-timeout", "300", "--heartbeat", "0"
        )
        await relay.wait_for_log_async("streaming from slot")
        proxy.partition()  # confirms stop coming back
        with psycopg.connect(outbox.dsn) as conn:
            outbox.insert(conn, [{"event_type": "Stuck"}])
        await asyncio.sleep(1.0)
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert relay.proc.poll() is None, relay.log()[-3000:]  # waiting for the confirm
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(relay.proc.wait, 15)
        assert time.monotonic() - started < 10
        assert code == 0 or code == -signal.SIGTERM or code == 1
        assert "second stop request" in relay.log()
    finally:
        proxy.heal()
        await proxy.close()


async def test_a_long_silent_transaction_is_waited_for_not_replayed_forever(
    outbox: Setup, consumer: Consumer, relays: Any
) -> None:
    """Postgres decoding a big transaction of other tables' changes sends nothing for a while.

    With --pg-timeout 1 the relay used to end the session, replay the same
    transaction from the slot, and time out again, forever. Now a probe on a
    fresh connection finds our walsender alive and the relay waits.
    """
    relay = relays(outbox, "--pg-timeout", "1")
    await relay.wait_for_log_async("streaming from slot")
    bulk = outbox.table + "_bulk"  # not in the publication
    with psycopg.connect(outbox.dsn) as conn:
        conn.execute(f"CREATE TABLE {bulk} (n int)")
        conn.execute(f"INSERT INTO {bulk} SELECT generate_series(1, 2000000)")
        [row] = outbox.insert(conn, [{"event_type": "AfterBulk"}])
    try:
        await consumer.wait_for({row}, timeout=120)
        log = relay.log()
        assert "our walsender runs" in log, "the decode was too quick to test anything"
        assert "session ended" not in log
        assert [d.message_id for d in consumer.deliveries].count(row) == 1
    finally:
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {bulk}")

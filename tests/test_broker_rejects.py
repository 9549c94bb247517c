"""The broker refuses or cannot route a message: no false success, no silent loss."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import psycopg
import pytest

from devtools.amqp import declare_exchange
from devtools.servers import free_port
from tests.harness import (
    Consumer,
    RelayProcess,
    Setup,
    metrics_text,
    parse_histogram,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture
def relay_log(tmp_path: Path) -> Path:
    return tmp_path / "relay.log"


def commit_rows(setup: Setup, n: int, *, one_per_txn: bool = False) -> list[str]:
    return commit_rows_with_lsns(setup, n, one_per_txn=one_per_txn)[0]


def commit_rows_with_lsns(
    setup: Setup, n: int, *, one_per_txn: bool = False
) -> tuple[list[str], list[int]]:
    """Commit rows; also return the WAL position right after each commit."""
    ids: list[str] = []
    lsns: list[int] = []
    with psycopg.connect(setup.dsn) as conn:
        for chunk in [[i] for i in range(n)] if one_per_txn else [list(range(n))]:
            ids += setup.insert(conn, [{"payload": {"i": i}} for i in chunk])
            conn.commit()
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            ).fetchone()
            conn.commit()
            assert row is not None
            lsns.append(int(row[0]))
    return ids, lsns


async def test_unroutable_with_fail_policy_never_advances_the_slot(
    outbox: Setup, relay_log: Path
) -> None:
    await declare_exchange(outbox.amqp_url, outbox.names["exchange"])  # no queue bound
    relay = RelayProcess(outbox, relay_log, "--on-unroutable", "fail").start()
    try:
        relay.wait_for_log("streaming from slot")
        flush_before = outbox.confirmed_flush()
        ids = commit_rows(outbox, 3)
        relay.wait_for_log("NO_ROUTE", timeout=30)
        await asyncio.sleep(2)
        # Postgres retains the rows for replay: the slot did not pass them.
        assert outbox.confirmed_flush() == flush_before
        assert "NO_ROUTE" in relay.log()
        # Once a queue is bound, the retried session delivers them all.
        consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
        try:
            await consumer.wait_for(set(ids), timeout=60)
        finally:
            await consumer.close()
        assert await wait_until(lambda: outbox.confirmed_flush() > flush_before, 10)
    finally:
        relay.stop_quietly()


async def test_nack_from_full_queue_is_retried_without_advancing(
    outbox: Setup, relay_log: Path
) -> None:
    consumer = Consumer(outbox.amqp_url, outbox.names["exchange"])
    # A queue that holds two messages and nacks the rest.
    connection = await aio_pika.connect(outbox.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(outbox.names["exchange"], "topic", durable=True)
    queue = await channel.declare_queue(
        consumer.queue_name,
        durable=True,
        arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange, "#")
    relay = RelayProcess(outbox, relay_log, "--max-in-flight", "10").start()
    try:
        relay.wait_for_log("streaming from slot")
        flush_before = outbox.confirmed_flush()
        ids, wal_after = commit_rows_with_lsns(outbox, 6, one_per_txn=True)
        relay.wait_for_log("nacked by broker", timeout=30)
        # The broker nacks the third row at once but acks the two it took only after
        # its fsync: the session waits for those acks and reports them before it
        # ends, or every later session would replay them into the full queue and be
        # refused the same way (a livelock CI once hit for 90 s).
        assert await wait_until(lambda: outbox.confirmed_flush() > wal_after[0], 10), (
            outbox.confirmed_flush(),
            wal_after,
            relay.log_tail(),
        )
        # Only what the broker took (two rows) may be flushed, never the rest.
        assert outbox.confirmed_flush() <= wal_after[1]
        # Drain the queue as a consumer would: everything arrives eventually.
        seen: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                seen.add(message.message_id or "")
                await message.ack()
            if seen >= set(ids):
                break
        assert seen >= set(ids)
        assert await wait_until(lambda: outbox.confirmed_flush() > flush_before, 15)
    finally:
        relay.stop_quietly()
        await connection.close()


async def test_unroutable_and_unmappable_rows_are_dead_lettered(
    outbox: Setup, relay_log: Path
) -> None:
    await declare_exchange(outbox.amqp_url, outbox.names["exchange"])
    consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"], "routed.#").start()
    port = free_port()
    relay = RelayProcess(
        outbox, relay_log, "--routing-key", "routed.{event_type}", "--metrics-port", str(port)
    ).start()
    try:
        relay.wait_for_log("streaming from slot")
        with psycopg.connect(outbox.dsn) as conn:
            good = outbox.insert(conn, [{"event_type": "A"}])
            unroutable = outbox.insert(conn, [{"routing_key": "nowhere.at.all"}])
            bad_headers = outbox.insert(conn, [{"headers": ["not", "an", "object"]}])
            after = outbox.insert(conn, [{"event_type": "B"}])
            conn.commit()
        await consumer.wait_for(set(good + after))
        listed = await asyncio.to_thread(run_cli, "dead-letters", "list", *outbox.cli_args())
        assert listed.returncode == 0, listed.stderr
        assert unroutable[0] in listed.stdout and "NO_ROUTE" in listed.stdout
        assert bad_headers[0] in listed.stdout and "headers must be a JSON object" in listed.stdout
        # The slot moved past all four rows.
        assert await wait_until(lambda: outbox.confirmed_lag() < 16 * 1024, 10)
        # One transaction, finished once its two dead letters were stored.
        text = await metrics_text(port)
        assert parse_histogram(text, "cdc_relay_commit_to_confirm_seconds")["count"] == 1
        slot = outbox.settings.slot
        for reason in ("unroutable", "bad_row"):  # one of each, labelled by reason
            dead = f'cdc_relay_messages_dead_lettered_total{{reason="{reason}",slot="{slot}"}}'
            assert f"{dead} 1.0" in text
        assert f'cdc_relay_messages_confirmed_total{{slot="{slot}"}} 2.0' in text
        # Bind a queue for the unroutable one and replay it.
        other = await Consumer(
            outbox.amqp_url, outbox.names["exchange"], "nowhere.#", queue="q_nowhere"
        ).start()
        try:
            replay = await asyncio.to_thread(run_cli, "dead-letters", "replay", *outbox.cli_args())
            assert "1 replayed, 1 failed" in replay.stderr, replay.stderr
            await other.wait_for(set(unroutable))
        finally:
            await other.close()
        pending = await asyncio.to_thread(run_cli, "dead-letters", "list", *outbox.cli_args())
        assert unroutable[0] not in pending.stdout
        assert bad_headers[0] in pending.stdout
    finally:
        relay.stop_quietly()
        await consumer.close()

"""``cdc-relay resync`` end to end: a lost slot, rows before and after the loss, no gap.

Real Postgres, real RabbitMQ, the real ``cdc-relay`` processes (resync and run).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
import pytest

from cdc_relay import state
from cdc_relay.errors import EX_CONFIG, ConfigError
from cdc_relay.pg import checks
from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import function_names
from devtools.amqp import queue_depth
from tests.harness import Consumer, RelayProcess, Setup, unique_names

pytestmark = pytest.mark.asyncio


def resync_cmd(setup: Setup, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cdc_relay.cli", "resync", *setup.cli_args(), *extra]


def debug(command: list[str]) -> list[str]:
    """The same command with --log-level debug: its progress lines go to the log."""
    at = command.index("cdc_relay.cli") + 1
    return [*command[:at], "--log-level", "debug", *command[at:]]


def run_resync(setup: Setup, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        resync_cmd(setup, *extra), capture_output=True, text=True, timeout=180, check=False
    )


def insert(setup: Setup, n: int, tag: str) -> list[str]:
    with psycopg.connect(setup.dsn) as conn:
        ids = setup.insert(
            conn, [{"aggregate_id": f"{tag}{i}", "payload": {"i": i}} for i in range(n)]
        )
        conn.commit()
    return ids


def drop_slot(setup: Setup) -> None:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (setup.names["slot"],))


def slot_row(setup: Setup) -> dict[str, Any] | None:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = %s",
            (setup.names["slot"],),
        ).fetchone()
    return None if row is None else dict(row[0])


def since_now(seconds_back: float = 5) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_back)).isoformat()


async def test_slot_dropped_while_stopped_resync_then_run_every_row_arrives(
    outbox: Setup, consumer: Consumer, tmp_path: Path
) -> None:
    since = since_now()
    relay = RelayProcess(outbox, tmp_path / "relay1.log").start()
    relay.wait_for_log("streaming from slot")
    streamed = insert(outbox, 50, "a")
    await consumer.wait_for(set(streamed))
    assert relay.stop() == 0

    before_drop = insert(outbox, 40, "b")  # committed while the slot still exists, never sent
    drop_slot(outbox)
    after_drop = insert(outbox, 30, "c")  # committed while no slot exists at all

    done = run_resync(outbox, "--since", since)
    assert done.returncode == 0, done.stderr
    assert "resync done: 120 row(s)" in done.stdout, done.stdout
    assert "120 confirmed" in done.stdout
    # Not on a terminal: one progress summary with the rate, no per-second lines.
    summaries = [line for line in done.stderr.splitlines() if "resync: published" in line]
    assert len(summaries) == 1 and "120 row(s) in " in summaries[0], done.stderr
    assert "/s)" in summaries[0], done.stderr
    assert slot_row(outbox) is not None

    relay = RelayProcess(outbox, tmp_path / "relay2.log").start()
    try:
        relay.wait_for_log("streaming from slot")
        later = insert(outbox, 25, "d")
        await consumer.wait_for(set(streamed + before_drop + after_drop + later))
    finally:
        relay.stop_quietly()
    ids = consumer.ids()
    # Mapped exactly as the stream maps a row: body, headers, properties.
    streamed_msg = next(d for d in consumer.deliveries if d.message_id == streamed[0])
    resynced_msg = next(d for d in consumer.deliveries if d.message_id == before_drop[0])
    assert resynced_msg.body == b'{"i": 0}' == streamed_msg.body
    assert resynced_msg.headers == {**streamed_msg.headers, "aggregate_id": "b0"}
    assert resynced_msg.routing_key == streamed_msg.routing_key == "order.Created"
    assert resynced_msg.properties["timestamp"] is not None
    assert {k: v for k, v in resynced_msg.properties.items() if k != "timestamp"} == {
        k: v for k, v in streamed_msg.properties.items() if k != "timestamp"
    }
    # The resync sends in created_at order: transaction b's rows all before c's (rows of
    # one transaction share created_at, so within it the table cannot tell the order).
    assert max(ids.index(i, len(streamed)) for i in before_drop) < min(
        ids.index(i, len(streamed)) for i in after_drop
    )


async def test_resync_killed_mid_publish_then_rerun_sends_everything(
    outbox: Setup, consumer: Consumer, tmp_path: Path
) -> None:
    since = since_now()
    rows: list[str] = []
    with psycopg.connect(outbox.dsn) as conn:
        conn.execute(
            f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT 'order', g::text, 'Created',"
            " jsonb_build_object('g', g, 'pad', repeat('x', 200))"
            " FROM generate_series(1, 60000) g"
        )
        conn.commit()
        rows = [r[0] for r in conn.execute(f"SELECT id::text FROM {outbox.table}").fetchall()]
    drop_slot(outbox)
    log = (tmp_path / "resync1.log").open("w")
    first = subprocess.Popen(
        debug(resync_cmd(outbox, "--since", since, "--max-in-flight", "50")),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "resync: published" not in (tmp_path / "resync1.log").read_text():
            assert first.poll() is None, (tmp_path / "resync1.log").read_text()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        first.kill()
    finally:
        first.wait()
        log.close()
    assert first.returncode == -9
    got = len(set(consumer.ids()))
    assert 0 < got < len(rows), "the kill did not land mid-publish"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        recorded = state.read(conn, state.table_name(outbox.settings), outbox.names["slot"])
    assert recorded is not None and recorded.resync_since is not None
    assert slot_row(outbox) is not None  # the healthy slot the killed run created

    # Re-run with a later --since: the interrupted run's start still wins.
    again = run_resync(outbox, "--since", since_now(-3600))
    assert again.returncode == 0, again.stderr
    assert "left by an interrupted resync" in again.stdout
    assert f"resync done: {len(rows)} row(s)" in again.stdout
    await consumer.wait_for(set(rows), timeout=120)
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        recorded = state.read(conn, state.table_name(outbox.settings), outbox.names["slot"])
    assert recorded is not None and recorded.resync_since is None


async def test_dry_run_counts_and_changes_nothing(outbox: Setup) -> None:
    since = since_now()
    with psycopg.connect(outbox.dsn) as conn:
        conn.execute(  # backdated rows are not counted
            f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload,"
            " created_at) SELECT 'o', g::text, 'Old', '{}', now() - interval '2 days'"
            " FROM generate_series(1, 7) g"
        )
        conn.commit()
    insert(outbox, 12, "n")
    drop_slot(outbox)
    done = run_resync(outbox, "--since", since, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would: outbox rows since" in done.stdout and ": 12" in done.stdout, done.stdout
    assert "would: replication slot" in done.stdout and "missing" in done.stdout
    assert slot_row(outbox) is None


async def test_refuses_while_a_relay_holds_the_slot(outbox: Setup, tmp_path: Path) -> None:
    relay = RelayProcess(outbox, tmp_path / "relay.log").start()
    try:
        relay.wait_for_log("streaming from slot")
        done = run_resync(outbox, "--since", since_now())
    finally:
        relay.stop_quietly()
    assert done.returncode == EX_CONFIG
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by pid" in lines[0], done.stderr


async def test_refuses_to_drop_a_healthy_slot(outbox: Setup) -> None:
    done = run_resync(outbox, "--since", since_now())
    assert done.returncode == EX_CONFIG
    assert "is not lost" in done.stderr and "cdc-relay drop" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_refuses_without_since_or_recorded_position(outbox: Setup) -> None:
    drop_slot(outbox)
    done = run_resync(outbox)
    assert done.returncode == EX_CONFIG
    assert "no --since given and no position recorded" in done.stderr


async def test_since_omitted_starts_at_recorded_commit_minus_margin(
    outbox: Setup, consumer: Consumer
) -> None:
    old = insert(outbox, 5, "old")
    recorded_at = datetime.now(UTC)
    await asyncio.sleep(0.2)
    new = insert(outbox, 6, "new")
    table = state.table_name(outbox.settings)
    conn = await psycopg.AsyncConnection.connect(outbox.dsn, autocommit=True)
    async with conn:
        await state.record(conn, table, outbox.names["slot"], recorded_at.timestamp(), 0x1000)
    drop_slot(outbox)
    # What `run` would print: the exact command, from the state row.
    with (
        psycopg.connect(outbox.dsn, autocommit=True) as sync,
        pytest.raises(ConfigError, match=r"cdc-relay resync --slot \S+ --since 20"),
    ):
        checks.validate(sync, outbox.settings)
    done = run_resync(outbox, "--margin", "0s")
    assert done.returncode == 0, done.stderr
    assert "recorded last confirmed commit" in done.stdout
    assert "resync done: 6 row(s)" in done.stdout, done.stdout
    await consumer.wait_for(set(new))
    await consumer.settle(0.5)
    assert not set(old) & set(consumer.ids())


async def test_unroutable_and_unmappable_rows_are_dead_lettered(outbox: Setup) -> None:
    since = since_now()
    # No queue is bound: every row comes back unroutable and becomes a dead letter;
    # one row's routing key cannot be rendered by the template and never reaches the broker.
    insert(outbox, 3, "u")
    with psycopg.connect(outbox.dsn) as conn:
        conn.execute(
            f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload,"
            " exchange) VALUES ('o', '1', 'E', '{}', 'bad exchange name!')"
        )
        conn.execute(  # a valid name the broker does not have: refused, not a stuck resync
            f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload,"
            " exchange) VALUES ('o', '2', 'E', '{}', 'no_such_exchange_x')"
        )
        conn.commit()
    drop_slot(outbox)
    done = run_resync(outbox, "--since", since)
    assert done.returncode == 0, done.stderr
    assert "5 dead-lettered" in done.stdout, done.stdout
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        reasons = [
            r[0]
            for r in conn.execute(
                f"SELECT reason FROM {outbox.table}_dead_letter ORDER BY id"
            ).fetchall()
        ]
    assert sum("returned by broker: 312 NO_ROUTE" in r for r in reasons) == 3, reasons
    assert sum("exchange" in r and "bad exchange name!" in r for r in reasons) == 1, reasons
    assert sum("'no_such_exchange_x' refused by the broker" in r for r in reasons) == 1, reasons


async def test_unreachable_broker_is_one_line_and_a_rerun_recovers(
    outbox: Setup, consumer: Consumer
) -> None:
    since = since_now()
    rows = insert(outbox, 10, "x")
    drop_slot(outbox)
    args = resync_cmd(outbox, "--since", since)
    url = args.index("--amqp-url") + 1
    args[url] = "amqp://guest:guest@127.0.0.1:1/"
    failed = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert failed.returncode == 1, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if not line.startswith("resync:")]
    assert len(lines) == 1 and "nothing is lost: run the same command again" in lines[0], lines
    done = run_resync(outbox, "--since", since)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted resync" in done.stdout
    await consumer.wait_for(set(rows))


async def test_tableless_setup_cannot_be_resynced(pg_dsn: str, amqp_url: str) -> None:
    setup = Setup(pg_dsn, amqp_url, unique_names("rsn"))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg_setup.init(conn, setup.settings, create_table=False)
    try:
        drop_slot(setup)
        done = run_resync(setup, "--since", since_now())
        assert done.returncode == EX_CONFIG
        assert "outbox_emit exist only in WAL and cannot be resynced" in done.stderr
    finally:
        setup.cleanup()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            schema, _ = setup.settings.table_parts
            emit = function_names(setup.settings.table_parts)[1]
            conn.execute(f"DROP FUNCTION IF EXISTS {schema}.{emit}")


async def test_relay_records_its_position_and_resync_needs_no_since(
    outbox: Setup, consumer: Consumer, tmp_path: Path
) -> None:
    relay = RelayProcess(outbox, tmp_path / "relay1.log").start()
    relay.wait_for_log("streaming from slot")
    delivered = insert(outbox, 10, "a")
    await consumer.wait_for(set(delivered))
    assert relay.stop() == 0
    table = state.table_name(outbox.settings)
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        recorded = state.read(conn, table, outbox.names["slot"])
        created = conn.execute(f"SELECT max(created_at) FROM {outbox.table}").fetchone()
    assert recorded is not None and recorded.confirmed_commit_at is not None
    assert created is not None and recorded.confirmed_commit_at >= created[0]
    missed = insert(outbox, 15, "b")
    drop_slot(outbox)

    refused = RelayProcess(outbox, tmp_path / "relay2.log").start()
    assert refused.proc is not None
    assert await asyncio.to_thread(refused.proc.wait, 60) == EX_CONFIG
    since = state.format_since(recorded.confirmed_commit_at - state.DEFAULT_MARGIN)
    assert f"cdc-relay resync --slot {outbox.names['slot']} --since {since}" in refused.log()

    done = run_resync(outbox)
    assert done.returncode == 0, done.stderr
    assert "recorded last confirmed commit" in done.stdout
    relay = RelayProcess(outbox, tmp_path / "relay3.log").start()
    try:
        relay.wait_for_log("streaming from slot")
        await consumer.wait_for(set(delivered + missed))
    finally:
        relay.stop_quietly()


async def test_resync_applies_the_exchange_policy_to_the_exchange_actually_used(
    outbox: Setup, consumer: Consumer
) -> None:
    """A Celery task without an exchange went to the default exchange unchecked (issue 16)."""
    leak = f"q_leak_{outbox.names['slot']}"
    connection = await aio_pika.connect(outbox.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(leak, auto_delete=False)
        await queue.bind("amq.topic", "#")
        since = since_now()
        ok = insert(outbox, 1, "ok")
        with psycopg.connect(outbox.dsn) as conn:
            outbox.insert(conn, [{"exchange": "amq.topic"}])
            outbox.insert(
                conn,
                [{"aggregate_type": "celery.task", "payload": {"args": []}, "routing_key": leak}],
            )
            conn.commit()
        drop_slot(outbox)
        done = await asyncio.to_thread(
            subprocess.run,
            resync_cmd(outbox, "--since", since),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            env={**os.environ, "CDC_RELAY_ALLOWED_EXCHANGES": outbox.names["exchange"]},
        )
        assert done.returncode == 0, done.stderr
        assert "1 confirmed by the broker, 2 dead-lettered" in done.stdout, done.stdout
        await consumer.wait_for(set(ok))
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            reasons = [
                r[0]
                for r in conn.execute(
                    f"SELECT reason FROM {outbox.table}_dead_letter ORDER BY id"
                ).fetchall()
            ]
        # Rows of one transaction share created_at: resync reads them in id order.
        assert len(reasons) == 2, reasons
        assert any("exchange 'amq.topic' is not allowed" in r for r in reasons), reasons
        assert any("default exchange '' is not allowed" in r for r in reasons), reasons
        assert await queue_depth(outbox.amqp_url, leak) == 0
        await channel.queue_delete(leak)

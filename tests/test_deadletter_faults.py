"""A poison row cannot stall the stream, and an unwritable dead-letter table heals.

Issue 16: one unroutable row whose payload held a million control characters took
the old writer (a text-array literal built by regular expressions) to 566 MB and,
under a memory cap, into a ``MemoryError`` on every start with the slot stuck.
These tests run the relay as a child under a real address-space cap.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_relay.config import Settings
from devtools.amqp import declare_exchange
from tests.harness import Consumer, RelayProcess, Setup, run_cli, wait_until

pytestmark = pytest.mark.asyncio

MEMORY_CAP = 1024 * 1024 * 1024  # RLIMIT_AS of the relay child
PEAK_RSS_LIMIT = 300 * 1024 * 1024  # the same rows published normally peak near 81 MB
UNROUTABLE = "nowhere.at.all"  # the consumer binds routed.# only

# Payloads as JSON text: a million escapes of each kind, and 1000 nested arrays.
ESCAPE_HEAVY = {
    "control": '{"s": "' + "\\u0001" * 1_000_000 + '"}',
    "quotes": '{"s": "' + '\\"' * 1_000_000 + '"}',
    "backslashes": '{"s": "' + "\\\\" * 1_000_000 + '"}',
    "nested": '{"s": ' + "[" * 1000 + '"deep"' + "]" * 1000 + "}",
}


class CappedRelay(RelayProcess):
    """The relay under ``prlimit --as``: an allocation over the cap raises MemoryError."""

    def args(self) -> list[str]:
        return ["prlimit", f"--as={MEMORY_CAP}", "--", *super().args()]

    def peak_rss(self) -> int:
        """VmHWM: the highest resident set size the process has had, in bytes."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


def dead_letters(setup: Setup) -> dict[str, dict[str, Any]]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT outbox_id, row_data FROM {setup.table}_dead_letter ORDER BY id"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def insert_json(setup: Setup, payload: str, routing_key: str) -> str:
    """One row whose payload is this JSON text (orjson cannot nest 1000 deep)."""
    with psycopg.connect(setup.dsn) as conn:
        row = conn.execute(
            f"INSERT INTO {setup.table} (aggregate_type, aggregate_id, event_type, payload,"
            " routing_key) VALUES ('order', '1', 'Poison', %s::jsonb, %s) RETURNING id::text",
            (payload, routing_key),
        ).fetchone()
        conn.commit()
    assert row is not None
    return str(row[0])


def insert_one(setup: Setup, row: dict[str, Any]) -> str:
    with psycopg.connect(setup.dsn) as conn:
        (id_,) = setup.insert(conn, [row])
        conn.commit()
    return id_


async def routed_consumer(setup: Setup) -> Consumer:
    await declare_exchange(setup.amqp_url, setup.names["exchange"])
    return await Consumer(setup.amqp_url, setup.names["exchange"], "routed.#").start()


async def test_escape_heavy_poison_rows_are_dead_lettered_under_a_memory_cap(
    outbox: Setup, tmp_path: Path
) -> None:
    consumer = await routed_consumer(outbox)
    relay = CappedRelay(outbox, tmp_path / "relay.log", "--routing-key", "routed.{event_type}")
    relay.start()
    try:
        relay.wait_for_log("streaming from slot")
        poison: dict[str, str] = {}
        for name, payload in ESCAPE_HEAVY.items():
            poison[name] = insert_json(outbox, payload, UNROUTABLE)
        after = [insert_one(outbox, {"event_type": f"After{i}"}) for i in range(3)]
        await consumer.wait_for(set(after), timeout=60)
        assert await wait_until(lambda: len(dead_letters(outbox)) == 4, 30), relay.log_tail()
        # The slot moved past the poison rows and the rows after them.
        assert await wait_until(lambda: outbox.confirmed_lag() < 16 * 1024, 15)
        relay.check_alive()
        peak = relay.peak_rss()
        print(f"peak RSS with escape-heavy dead letters: {peak / 2**20:.0f} MiB")
        assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
        assert "Traceback" not in relay.log() and "MemoryError" not in relay.log()
        stored = dead_letters(outbox)
        for name in ("control", "quotes", "backslashes"):
            data = stored[poison[name]]
            assert data["truncated"] == ["payload"], name
            assert data["payload"]["size"] > 1_000_000 and len(data["payload"]["sha256"]) == 64
        assert "truncated" not in stored[poison["nested"]]  # small: kept whole
        assert stored[poison["nested"]]["payload"].startswith('{"s": [[[[')
    finally:
        relay.stop_quietly()
        await consumer.close()


async def test_a_second_sigterm_stops_a_relay_writing_a_huge_dead_letter(
    outbox: Setup, tmp_path: Path
) -> None:
    consumer = await routed_consumer(outbox)
    relay = CappedRelay(outbox, tmp_path / "relay.log", "--routing-key", "routed.{event_type}")
    relay.start()
    try:
        relay.wait_for_log("streaming from slot")
        with psycopg.connect(outbox.dsn) as locker:
            # Hold the dead-letter write on a lock, so it is being written when we stop.
            locker.execute(f"LOCK TABLE {outbox.table}_dead_letter IN ACCESS EXCLUSIVE MODE")
            insert_one(outbox, {"routing_key": UNROUTABLE, "payload": {"s": "\x01" * 3_000_000}})

            def writer_waits() -> bool:
                with psycopg.connect(outbox.dsn, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND application_name = 'cdc-relay dead letters'"
                    ).fetchone()
                return row is not None and row[0] > 0

            assert await wait_until(writer_waits, 30), relay.log_tail()
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            relay.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = await asyncio.to_thread(relay.proc.wait, 30)
            elapsed = time.monotonic() - started
            locker.rollback()
        print(f"exit {code} {elapsed:.2f}s after the second SIGTERM")
        assert code == 0, relay.log_tail()
        assert elapsed < 5, f"{elapsed:.1f}s"
        assert "second stop request" in relay.log()
        assert dead_letters(outbox) == {}  # not stored: the next run writes it again
    finally:
        relay.stop_quietly()
        await consumer.close()


@pytest.fixture
def relay_role(outbox: Setup) -> Iterator[str]:
    """A LOGIN REPLICATION role given what ``init --grant-to`` grants, nothing more."""
    role = f"relay_dlw_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    done = run_cli("init", "--grant-to", role, *outbox.cli_args("init"))
    assert done.returncode == 0, done.stderr
    yield role
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        for _ in range(50):  # the relay's sessions may still be closing
            try:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
                break
            except psycopg.errors.DependentObjectsStillInUse:
                time.sleep(0.1)


async def test_a_revoked_dead_letter_grant_is_retried_and_heals_without_a_restart(
    outbox: Setup, relay_role: str, tmp_path: Path
) -> None:
    consumer = await routed_consumer(outbox)
    settings = Settings(
        dsn=make_conninfo(outbox.dsn, user=relay_role),
        amqp_urls=[outbox.amqp_url],
        **outbox.names,
    )
    relay = RelayProcess(
        settings,
        tmp_path / "relay.log",
        "--routing-key",
        "routed.{event_type}",
        "--reconnect-min",
        "0.2",
        "--reconnect-max",
        "1",
    ).start()
    dl_table = sql.SQL(f"{outbox.table}_dead_letter")
    grant = sql.SQL("INSERT ON {} ").format(dl_table)
    role = sql.Identifier(relay_role)
    try:
        relay.wait_for_log("streaming from slot")
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(grant, role))
        poison = insert_one(outbox, {"routing_key": UNROUTABLE})
        after = insert_one(outbox, {"event_type": "After"})
        flush_before = outbox.confirmed_flush()
        await relay.wait_for_log_async("cannot store dead letters", 30)
        # The next sessions find the grant missing at their startup checks: retried too.
        await relay.wait_for_log_async(f"it lacks INSERT on {outbox.table}_dead_letter", 30)
        await asyncio.sleep(3)
        relay.check_alive()  # still running: no exit 78
        assert dead_letters(outbox) == {}
        assert outbox.confirmed_flush() == flush_before  # the slot waits for the dead letter
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT {} TO {}").format(grant, role))
        assert await wait_until(lambda: poison in dead_letters(outbox), 30), relay.log_tail()
        await consumer.wait_for({after}, timeout=30)
        assert await wait_until(lambda: outbox.confirmed_lag() < 16 * 1024, 15)
        relay.check_alive()
        log = relay.log()
        assert "grant it: run `cdc-relay init --grant-to <relay role>`" in log
        assert "Traceback" not in log
    finally:
        relay.stop_quietly()
        await consumer.close()


async def test_a_dropped_dead_letter_table_is_retried_until_init_recreates_it(
    outbox: Setup, tmp_path: Path
) -> None:
    consumer = await routed_consumer(outbox)
    relay = RelayProcess(
        outbox,
        tmp_path / "relay.log",
        "--routing-key",
        "routed.{event_type}",
        "--reconnect-min",
        "0.2",
        "--reconnect-max",
        "1",
    ).start()
    try:
        relay.wait_for_log("streaming from slot")
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {outbox.table}_dead_letter")
        poison = insert_one(outbox, {"routing_key": UNROUTABLE})
        after = insert_one(outbox, {"event_type": "After"})
        await relay.wait_for_log_async("cannot store dead letters (UndefinedTable", 30)
        await relay.wait_for_log_async("does not exist; run `cdc-relay init`", 30)
        await asyncio.sleep(2)
        relay.check_alive()
        done = await asyncio.to_thread(run_cli, "init", *outbox.cli_args())
        assert done.returncode == 0, done.stderr
        assert await wait_until(lambda: poison in dead_letters(outbox), 30), relay.log_tail()
        await consumer.wait_for({after}, timeout=30)
        relay.check_alive()
    finally:
        relay.stop_quietly()
        await consumer.close()


async def test_a_first_start_without_the_dead_letter_table_exits_78(
    outbox: Setup, tmp_path: Path
) -> None:
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {outbox.table}_dead_letter")
    relay = RelayProcess(outbox, tmp_path / "relay.log").start()
    assert relay.proc is not None
    code = await asyncio.to_thread(relay.proc.wait, 30)
    assert code == 78
    assert "does not exist; run `cdc-relay init`" in relay.log()

"""Issue 16: publication drift caught while streaming, and operators no longer blind.

Against real Postgres and RabbitMQ: the outbox leaving its publication, a
recreated outbox, a locked dead-letter table under `status` and `dead-letters
list`, a broker alarm, and what a running relay reports through its state row.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest

from cdc_relay import state
from devtools.metrics import readyz
from devtools.rabbit import RabbitServer
from devtools.servers import free_port
from tests.harness import Consumer, RelayProcess, Setup, run_cli, wait_until

pytestmark = [pytest.mark.integration]
async_test = pytest.mark.asyncio


def status(outbox: Setup, *extra: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    done = run_cli("status", *outbox.cli_args("status"), *extra, timeout=60)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def backends_waiting(dsn: str, needle: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()"
            " AND state = 'active'",
            (f"%{needle}%",),
        ).fetchone()
    return row[0] if row else 0


def test_status_and_dead_letters_list_answer_while_the_dead_letter_table_is_locked(
    outbox: Setup,
) -> None:
    """Before: status still waited after 90 s and its query stayed queued after a kill."""
    dl = ".".join(outbox.settings.dead_letter_table)
    with psycopg.connect(outbox.dsn) as locker:
        locker.execute(f"LOCK TABLE {dl} IN ACCESS EXCLUSIVE MODE")
        code, out, _err, took = status(outbox, "--no-require-active")
        assert took < 15, took
        assert code == 1
        assert f"could not read dead-letter table {dl}: it is locked" in out
        listed = run_cli("dead-letters", "list", *outbox.cli_args("dead-letters list"), timeout=60)
        assert listed.returncode == 1
        [line] = listed.stderr.strip().splitlines()
        assert line.startswith(f"cdc-relay: error: could not read dead-letter table {dl}: ")
        started = time.monotonic()
        pruned = run_cli(
            "dead-letters", "prune", "--older-than", "1d", *outbox.cli_args("dead-letters prune")
        )
        assert time.monotonic() - started < 15
        assert pruned.returncode == 1
        [line] = pruned.stderr.strip().splitlines()
        assert "canceling statement due to lock timeout [SQLSTATE 55P03]" in line, line
        assert backends_waiting(outbox.dsn, f"FROM {dl}") == 0
        locker.rollback()
    code, out, _err, _took = status(outbox, "--no-require-active")
    assert code == 0, out


def write_health(outbox: Setup, **columns: object) -> None:
    table = ".".join(state.table_name(outbox.settings))
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} (slot_name, {names}) VALUES (%s, {marks})"
            f" ON CONFLICT (slot_name) DO UPDATE SET ({names}) = ROW({marks})",
            (outbox.settings.slot, *columns.values(), *columns.values()),
        )


def test_status_says_what_a_running_relay_reports(outbox: Setup) -> None:
    """The reporting path of failing dead-letter writes (the retry itself is another change):
    a relay between sessions is "reported Ns ago", not "no relay is attached"."""
    now = datetime.now(UTC)
    failing = "dead-letter writes fail (permission denied for table x): retrying"
    write_health(outbox, problem=failing, problem_since=now, heartbeat_at=now)
    code, out, _err, _took = status(outbox)
    assert code == 1
    assert "no relay is attached" not in out
    assert re.search(rf"but a relay reported \d+s ago: {re.escape(failing)}", out), out
    assert f"the relay reports (since {state.format_since(now)}): {failing}" in out
    # A relay that stopped saying anything a while ago is not believed.
    write_health(outbox, heartbeat_at=now - timedelta(minutes=5))
    code, out, _err, _took = status(outbox)
    assert code == 1 and f"no relay is attached to slot {outbox.settings.slot}" in out
    assert failing not in out


def test_status_reports_a_flush_that_does_not_move(outbox: Setup) -> None:
    now = datetime.now(UTC)
    write_health(outbox, waiting_since=now - timedelta(seconds=300), heartbeat_at=now)
    code, out, _err, _took = status(outbox, "--no-require-active")
    assert code == 1
    # 300 s and the time the command took to start.
    assert re.search(r"confirmed position has not moved for 3\d\ds with messages waiting", out), out
    code, out, _err, _took = status(outbox, "--no-require-active", "--max-stall", "10m")
    assert code == 0, out


@async_test
async def test_the_outbox_leaving_its_publication_is_said_and_turns_readiness_red(
    outbox: Setup, relays: Callable[..., RelayProcess]
) -> None:
    """Before: rows skipped without a word, /readyz 200, status healthy."""
    port = free_port()
    relay = relays(outbox, "--metrics-port", str(port))
    await relay.wait_for_log_async("streaming from slot")
    pub, table = outbox.settings.publication, outbox.table
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER PUBLICATION {pub} DROP TABLE {table}")
        await relay.wait_for_log_async(f"publication {pub} does not cover the outbox", 20)
        assert await wait_until(lambda: readyz(port) == 503, 5)
        line = next(x for x in relay.log().splitlines() if "does not cover the outbox" in x)
        assert "ERROR" in line and f"ALTER PUBLICATION {pub} ADD TABLE {table}" in line
        assert "cdc-relay resync --slot" in line and "--since 20" in line
        # The relay writes what it reports to its state row within about a second.
        assert await wait_until(lambda: "the relay reports (since 20" in status(outbox)[1], 10)
        code, out, _err, _took = status(outbox)
        assert code == 1 and "the relay reports (since 20" in out, out
        conn.execute(f"ALTER PUBLICATION {pub} ADD TABLE {table}")
        await relay.wait_for_log_async("covers the outbox again", 20)
        assert await wait_until(lambda: readyz(port) == 200, 5)
        assert await wait_until(lambda: status(outbox)[0] == 0, 15)


@async_test
async def test_a_recreated_outbox_is_adopted(
    outbox: Setup, relays: Callable[..., RelayProcess], consumer: Consumer
) -> None:
    """Before: `init` left the new table out of the publication; once it was added, its
    rows were "not the outbox" dead letters until the relay restarted."""
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {outbox.table}")
        await relay.wait_for_log_async(f"outbox table {outbox.table} was dropped", 20)
        outbox.init()
        await relay.wait_for_log_async("was recreated (OID", 20)
    await asyncio.to_thread(relay.wait_for_log, "streaming from slot", 30)
    assert await wait_until(lambda: relay.log().count("streaming from slot") == 2, 30)
    with psycopg.connect(outbox.dsn) as conn:
        ids = outbox.insert(conn, [{"event_type": "AfterRecreate"}])
        conn.commit()
    await consumer.wait_for(set(ids))
    listed = run_cli("dead-letters", "list", *outbox.cli_args("dead-letters list"))
    assert listed.stderr.strip().endswith("0 dead letter(s)"), listed.stderr


@async_test
async def test_a_broker_alarm_makes_status_unhealthy(
    outbox: Setup, relays: Callable[..., RelayProcess], rabbit_server: RabbitServer
) -> None:
    """Before: status healthy and /readyz 200 for 70 s while nothing was delivered."""
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    rabbit_server.ctl("set_vm_memory_high_watermark", "0.0000001")
    try:
        with psycopg.connect(outbox.dsn) as conn:
            outbox.insert(conn, [{"event_type": "DuringAlarm"}])
            conn.commit()
        await relay.wait_for_log_async("RabbitMQ blocked the connection", 30)

        def blocked() -> bool:
            code, out, _err, _took = status(outbox)
            return code == 1 and "RabbitMQ has blocked the relay's connection since" in out

        assert await wait_until(blocked, 20, interval=1)
    finally:
        rabbit_server.ctl("set_vm_memory_high_watermark", "0.4")
    await relay.wait_for_log_async("RabbitMQ unblocked the connection", 30)
    assert await wait_until(lambda: status(outbox)[0] == 0, 20, interval=1)


@async_test
async def test_status_says_a_relay_runs_while_its_dead_letter_writes_fail(
    outbox: Setup, relays: Callable[..., RelayProcess]
) -> None:
    """Before: "no relay is attached" while the relay was running and retrying."""
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    dl = ".".join(outbox.settings.dead_letter_table)
    with psycopg.connect(outbox.dsn) as locker:
        locker.execute(f"LOCK TABLE {dl} IN ACCESS EXCLUSIVE MODE")
        with psycopg.connect(outbox.dsn) as conn:
            outbox.insert(conn, [{"headers": ["not", "an", "object"]}])  # a dead letter
            conn.commit()
        await relay.wait_for_log_async("cannot store dead letters", 30)

        def reported() -> list[str]:
            done = run_cli("status", "--json", *outbox.cli_args("status"), timeout=60)
            problems: list[str] = orjson.loads(done.stdout)["problems"]
            return [p for p in problems if p.startswith("the relay reports")]

        deadline = time.monotonic() + 60
        found = await asyncio.to_thread(reported)
        while not any("lock timeout" in p for p in found) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            found = await asyncio.to_thread(reported)
        assert any("lock timeout" in p for p in found), found
        locker.rollback()
    # Once the dead letter is stored, the relay says nothing is wrong any more.
    assert await wait_until(lambda: status(outbox)[0] == 0, 40, interval=1)


@async_test
async def test_a_relay_on_an_older_state_table_streams_without_reporting(
    outbox: Setup, relays: Callable[..., RelayProcess], consumer: Consumer
) -> None:
    table = ".".join(state.table_name(outbox.settings))
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        for column in state.HEALTH_COLUMNS:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    relay = relays(outbox)
    await relay.wait_for_log_async("lacks the health columns", 30)
    with psycopg.connect(outbox.dsn) as conn:
        ids = outbox.insert(conn, [{"event_type": "OldStateTable"}])
        conn.commit()
    await consumer.wait_for(set(ids))
    code, out, _err, _took = status(outbox)
    assert code == 0, out
    assert relay.log().count("lacks the health columns") == 1


@async_test
async def test_a_relay_that_stopped_cleanly_is_not_heard_any_more(
    outbox: Setup, relays: Callable[..., RelayProcess]
) -> None:
    table = ".".join(state.table_name(outbox.settings))

    def heartbeat() -> object:
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT heartbeat_at FROM {table} WHERE slot_name = %s", (outbox.settings.slot,)
            ).fetchone()
        return None if row is None else row[0]

    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    assert await wait_until(lambda: heartbeat() is not None, 10)
    assert relay.stop() == 0
    assert heartbeat() is None
    code, out, _err, _took = status(outbox)
    assert code == 1 and f"no relay is attached to slot {outbox.settings.slot}" in out, out

"""No relay streams from a resync's slot until that resync has finished.

Real Postgres, RabbitMQ and processes: a resync really killed (-9) part way,
a relay started on its slot, ``status``, a second resync beside a first one.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from cdc_relay import resync_guard, state
from cdc_relay.errors import EX_CONFIG
from cdc_relay.pg.replication import ReplicationStream
from tests.harness import Consumer, RelayProcess, Setup, run_cli
from tests.test_resync import debug, drop_slot, insert, resync_cmd, since_now

pytestmark = pytest.mark.asyncio

BACKLOG = 40_000  # rows: enough that a throttled resync is still publishing when killed


def backlog(setup: Setup, n: int = BACKLOG) -> list[str]:
    with psycopg.connect(setup.dsn) as conn:
        conn.execute(
            f"INSERT INTO {setup.table} (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT 'order', g::text, 'Created', jsonb_build_object('g', g)"
            " FROM generate_series(1, %s) g",
            (n,),
        )
        conn.commit()
        return [r[0] for r in conn.execute(f"SELECT id::text FROM {setup.table}").fetchall()]


async def start_resync(setup: Setup, log: Path, *extra: str) -> subprocess.Popen[str]:
    """A resync child, returned once it published some rows (bounded to 60 s)."""
    with log.open("w") as out:
        child = subprocess.Popen(
            debug(resync_cmd(setup, *extra)), stdout=out, stderr=subprocess.STDOUT, text=True
        )
    deadline = time.monotonic() + 60
    while "resync: published" not in log.read_text():
        assert child.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.05)
    return child


def status(setup: Setup) -> tuple[int, dict[str, object]]:
    """``status`` without requiring a relay: only the resync makes it unhealthy here."""
    done = run_cli("status", "--json", "--no-require-active", *setup.cli_args("status"))
    return done.returncode, json.loads(done.stdout)


async def test_relay_refuses_an_interrupted_resyncs_slot_until_it_is_rerun(
    outbox: Setup, consumer: Consumer, tmp_path: Path
) -> None:
    since = since_now()
    rows = backlog(outbox)
    drop_slot(outbox)
    first = await start_resync(
        outbox, tmp_path / "resync1.log", "--since", since, "--max-in-flight", "20"
    )
    first.kill()
    assert first.wait(10) == -9
    assert 0 < len(set(consumer.ids())) < len(rows), "the kill did not land mid-publish"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        recorded = state.read(conn, state.table_name(outbox.settings), outbox.names["slot"])
    assert recorded is not None and recorded.resync_since is not None
    command = resync_guard.resync_command(outbox.settings, recorded.resync_since)

    relay = RelayProcess(outbox, tmp_path / "relay1.log").start()
    assert relay.proc is not None
    assert await asyncio.to_thread(relay.proc.wait, 60) == EX_CONFIG
    assert f"run `{command}`" in relay.log(), relay.log()
    assert "streaming from slot" not in relay.log()

    code, info = status(outbox)
    assert code == 1 and command in str(info["problems"][0]), info

    # The command the relay named (its --slot is among the test's own options).
    rerun = resync_cmd(outbox, "--since", state.format_since(recorded.resync_since))
    again = await asyncio.to_thread(
        subprocess.run, rerun, capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 0, again.stderr
    assert f"resync done: {len(rows)} row(s)" in again.stdout, again.stdout
    relay = RelayProcess(outbox, tmp_path / "relay2.log").start()
    try:
        relay.wait_for_log("streaming from slot")
        later = insert(outbox, 10, "late")
        await consumer.wait_for(set(rows + later), timeout=120)
    finally:
        relay.stop_quietly()
    assert status(outbox)[0] == 0


async def test_relay_stands_by_while_a_resync_runs_and_a_second_resync_is_one_line(
    outbox: Setup, consumer: Consumer, tmp_path: Path
) -> None:
    since = since_now()
    rows = backlog(outbox, 20_000)
    drop_slot(outbox)
    first = await start_resync(
        outbox,
        tmp_path / "resync1.log",
        "--since",
        since,
        "--max-in-flight",
        "20",
        "--heartbeat",
        "0",  # the broker must not close a paused resync's connection
    )
    # Paused (its connections and its advisory lock stay), so that it is still under way
    # while the relay and the second resync look, however fast the machine drains it.
    first.send_signal(signal.SIGSTOP)
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        assert resync_guard.resync_holder(conn, outbox.names["slot"]) is not None, (
            "the first resync finished before it could be paused"
        )
    relay = RelayProcess(outbox, tmp_path / "relay.log").start()
    try:
        await relay.wait_for_log_async("standing by: a resync of replication slot")
        code, info = status(outbox)
        assert code == 1 and "is under way" in str(info["problems"][0]), info

        second = await asyncio.to_thread(
            subprocess.run,
            resync_cmd(outbox, "--since", since),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == EX_CONFIG, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "another resync" in lines[0] and "under way" in lines[0], (
            second.stderr
        )
        assert "streaming from slot" not in relay.log()

        first.send_signal(signal.SIGCONT)
        assert await asyncio.to_thread(first.wait, 180) == 0, (tmp_path / "resync1.log").read_text()
        await relay.wait_for_log_async("streaming from slot", timeout=30)
        later = insert(outbox, 10, "late")
        await consumer.wait_for(set(rows + later), timeout=120)
    finally:
        relay.stop_quietly()
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()


async def test_resync_refusal_for_a_held_slot_of_an_unfinished_resync_never_says_let_it_stream(
    outbox: Setup,
) -> None:
    """A relay of an older version may hold such a slot: the one line says to stop it."""
    since = datetime(2026, 11, 28, 9, 15, 15, tzinfo=UTC)
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        state.create(conn, state.table_name(outbox.settings))
        state.mark_resync(conn, state.table_name(outbox.settings), outbox.names["slot"], since)
    holder = await ReplicationStream.connect(outbox.dsn)
    try:
        await holder.start(outbox.names["slot"], outbox.names["publication"])
        done = await asyncio.to_thread(
            subprocess.run,
            resync_cmd(outbox, "--since", "2026-11-28T09:00:00+00:00"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        await holder.close()
    assert done.returncode == EX_CONFIG, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not finish" in lines[0], done.stderr
    assert "stop every relay on the slot" in lines[0] and "let it stream" not in lines[0]
    assert "--since 2026-11-28T09:15:15+00:00" in lines[0]

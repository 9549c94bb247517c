"""Issue 11: the relay follows a Postgres failover through a PG 17 failover slot.

A primary and a physical standby (``PostgresPair``: ``sync_replication_slots``,
``hot_standby_feedback``, ``synchronized_standby_slots``), the slot made by
``cdc-relay init --failover``, and the relay on the multi-host DSN
(``target_session_attrs=read-write``) streaming under load. The primary is
stopped in immediate mode and the standby promoted: every row the promoted
server holds must arrive, and none that it lacks (no phantom events).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import psycopg
import pytest

from cdc_relay.pg import report
from devtools.pgha import PostgresPair
from tests.faults import Workload, verify
from tests.harness import Consumer, RelayProcess, Setup, unique_names
from tests.harness import run_cli as cli

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]

STREAMING = "streaming from slot"


def status_of(dsn: str, setup: Setup) -> dict[str, object]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return report.status(conn, setup.settings, require_active=False).as_dict()


async def test_relay_follows_promotion_with_nothing_lost_and_no_phantoms(
    pg_pair: PostgresPair, amqp_url: str, tmp_path: Path
) -> None:
    setup = Setup(pg_pair.dsn, amqp_url, unique_names("hapg"))
    created = cli("init", "--failover", *setup.cli_args("init"))
    assert created.returncode == 0, created.stderr
    assert f"replication slot {setup.names['slot']}: created at" in created.stdout
    assert "(failover)" in created.stdout
    again = cli("init", "--failover", *setup.cli_args("init"))
    assert f"replication slot {setup.names['slot']}: already exists (failover)" in again.stdout

    primary = status_of(pg_pair.primary.dsn, setup)
    assert primary["role"] == "primary" and primary["failover"] is True
    assert primary["warnings"] == []  # synchronized_standby_slots is set
    consumer = await Consumer(amqp_url, setup.names["exchange"]).start()
    relay = RelayProcess(setup, tmp_path / "relay.log", log_level="INFO").start()
    try:
        await relay.wait_for_log_async(STREAMING, 30)
        workload = Workload(setup, total_rows=4000, rows_per_second=400, max_seconds=60).start()
        # Readiness: the standby's copy becomes persistent once the relay confirms
        # past a standby snapshot (wait_synced logs one on the primary).
        await asyncio.to_thread(pg_pair.wait_synced, setup.names["slot"], 60)
        ready = status_of(pg_pair.standby.dsn, setup)
        assert ready["role"] == "standby"
        assert (ready["synced"], ready["temporary"], ready["failover_ready"]) == (
            True,
            False,
            True,
        )
        assert ready["healthy"] is True, ready["problems"]
        status = cli(
            "status", "--json", "--dsn", pg_pair.standby.dsn, *setup.cli_args("status")[2:]
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["failover_ready"] is True, status.stdout

        await asyncio.sleep(1)
        began = time.monotonic()
        await asyncio.to_thread(pg_pair.failover)
        promoted = time.monotonic() - began
        deadline = time.monotonic() + 60
        while relay.log().count(STREAMING) < 2:
            assert time.monotonic() < deadline, relay.log_tail()
            relay.check_alive()
            await asyncio.sleep(0.05)
        resumed = time.monotonic() - began

        await workload.wait(90)
        verdict = await verify(setup, consumer, timeout=90)  # the promoted server's rows
        print(
            f"\npostgres failover (PG 17): promotion took {promoted:.2f}s, relay streaming "
            f"from the promoted server {resumed:.2f}s after the primary died; "
            + verdict.row("primary killed, standby promoted")
            + f"; writer errors {workload.errors}"
        )
        assert verdict.lost == 0
        # The promoted server has no standby of its own: status warns about it.
        after = status_of(pg_pair.standby.dsn, setup)
        assert after["role"] == "primary" and after["failover"] is True
        assert any("synchronized_standby_slots is empty" in w for w in after["warnings"])  # type: ignore[attr-defined]
        relay.check_alive()
    finally:
        await consumer.close()
        relay.stop_quietly()

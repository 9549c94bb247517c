"""Issue 11: two relays on one slot; the standby takes over from a killed or frozen one.

A private Postgres with a short ``wal_sender_timeout`` (a frozen relay holds the
slot until the walsender gives up on it). Under load: kill -9 the active relay
(its connection is reset at once), then SIGSTOP the new active one (the other
takes over after wal_sender_timeout), then SIGCONT it: it must find its
connection gone and the slot busy, and stand by. Nothing is lost throughout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from cdc_relay.pg import report
from devtools.metrics import readyz, role
from devtools.servers import PostgresServer, free_port
from tests.faults import Workload, verify
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, unique_names

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]

WAL_SENDER_TIMEOUT = 3.0
TAKEN_OVER = "is free: taking over"
STANDING_BY = "standing by:"


@pytest.fixture(scope="module")
def short_timeout_pg(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory(settings={"wal_sender_timeout": f"'{WAL_SENDER_TIMEOUT:g}s'"})


@pytest_asyncio.fixture
async def outbox(short_timeout_pg: PostgresServer, amqp_url: str) -> AsyncIterator[Setup]:
    setup = Setup(short_timeout_pg.dsn, amqp_url, unique_names("hastb"))
    setup.init()
    yield setup
    setup.cleanup()


async def wait_log(relay: RelayProcess, text: str, count: int, timeout: float) -> float:
    """Wait until ``text`` occurs ``count`` times in the relay's log; the time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.log().count(text) >= count:
            return time.monotonic()
        relay.check_alive()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} x{count} not in log after {timeout}s:\n{relay.log_tail()}")


def slot_status(setup: Setup) -> dict[str, object]:
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        return report.status(conn, setup.settings).as_dict()


async def test_standby_takes_over_from_killed_and_frozen_relays(
    outbox: Setup, tmp_path: Path
) -> None:
    consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
    ports = [free_port(), free_port(), free_port()]
    first = RelayProcess(outbox, tmp_path / "a.log", log_level="INFO", metrics_port=ports[0])
    second = RelayProcess(outbox, tmp_path / "b.log", log_level="INFO", metrics_port=ports[1])
    third = RelayProcess(outbox, tmp_path / "c.log", log_level="INFO", metrics_port=ports[2])
    relays = [first, second, third]
    try:
        first.start()
        await first.wait_ready(30)
        second.start()
        await wait_log(second, STANDING_BY, 1, 30)
        # Both are ready in their role (a rollout completes); role and status tell them apart.
        assert readyz(first.metrics_port or 0) == readyz(second.metrics_port or 0) == 200
        assert (role(first.metrics_port or 0), role(second.metrics_port or 0)) == (
            "active",
            "standby",
        )
        status = slot_status(outbox)
        assert status["active"] is True, status
        assert str(status["active_client"]).startswith(f"cdc-relay {socket.gethostname()}"), status
        assert f":{first.pid} at " in str(status["active_client"]), status

        workload = Workload(outbox, total_rows=4000, rows_per_second=500, max_seconds=60).start()
        await asyncio.sleep(1.5)
        killed_at = time.monotonic()
        first.kill()
        kill_takeover = await wait_log(second, TAKEN_OVER, 1, 15) - killed_at
        await second.wait_ready(15)

        third.start()
        await wait_log(third, STANDING_BY, 1, 30)
        await asyncio.sleep(1)
        assert second.proc is not None
        stopped_at = time.monotonic()
        os.kill(second.pid, signal.SIGSTOP)
        try:
            freeze_takeover = await wait_log(third, TAKEN_OVER, 1, WAL_SENDER_TIMEOUT + 15)
            freeze_takeover -= stopped_at
            await third.wait_ready(15)
        finally:
            os.kill(second.pid, signal.SIGCONT)
        # The thawed relay finds its walsender gone and the slot held: it stands by.
        await wait_log(second, STANDING_BY, 2, 30)

        await workload.wait(90)
        verdict = await verify(outbox, consumer, timeout=60)
        assert readyz(third.metrics_port or 0) == readyz(second.metrics_port or 0) == 200
        assert (role(third.metrics_port or 0), role(second.metrics_port or 0)) == (
            "active",
            "standby",
        )
        second.check_alive()
        third.check_alive()
        print(
            f"\nactive/standby relays: takeover after kill -9 {kill_takeover:.2f}s, after "
            f"SIGSTOP {freeze_takeover:.2f}s (wal_sender_timeout {WAL_SENDER_TIMEOUT:g}s); "
            + verdict.row("kill -9 then SIGSTOP of the active relay")
        )
        assert verdict.lost == 0
        assert kill_takeover < 5, kill_takeover
        assert WAL_SENDER_TIMEOUT - 1 < freeze_takeover < WAL_SENDER_TIMEOUT + 10
    finally:
        await consumer.close()
        for relay in relays:
            if relay.proc is not None and relay.proc.poll() is None:
                os.kill(relay.pid, signal.SIGCONT)
            relay.stop_quietly()

"""Issue 11: a slot that vanishes after the relay streamed is waited for, not fatal at once.

After a failover the server now accepting writes may not have the slot yet (or
never: a standby without a sync-ready copy). A relay that has streamed from the
slot retries for a bounded time instead of exiting 78 on the first attempt; at
startup a missing slot is still refused at once (tests/test_startup_validation).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest

from tests.harness import Consumer, RelayProcess, Setup, wait_until

pytestmark = [pytest.mark.asyncio, pytest.mark.integration]


async def test_relay_waits_for_a_slot_that_vanished_after_streaming(
    outbox: Setup, tmp_path: Path
) -> None:
    slot = outbox.names["slot"]
    consumer = await Consumer(outbox.amqp_url, outbox.names["exchange"]).start()
    relay = RelayProcess(
        outbox, tmp_path / "relay.log", "--reconnect-min", "2", "--reconnect-max", "2"
    )
    relay.log_level = "INFO"
    relay.start()
    try:
        await relay.wait_for_log_async("streaming from slot", 30)
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            # The server "loses" the slot under the relay, as a failover to a standby
            # without a ready copy does.
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )

            def inactive() -> bool:
                row = conn.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                return row is not None and not row[0]

            assert await wait_until(inactive, 5, 0.02)
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            await relay.wait_for_log_async("a failover in progress? retrying", 15)
            await asyncio.sleep(2.5)  # another attempt, still missing: still running
            relay.check_alive()
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        await asyncio.to_thread(wait_for_second_session, relay)
        with psycopg.connect(outbox.dsn) as conn:
            ids = outbox.insert(conn, [{"payload": {"after": "recreated"}}])
            conn.commit()
        await consumer.wait_for(set(ids), timeout=30)
        assert relay.terminate(30) == 0
    finally:
        await consumer.close()
        relay.stop_quietly()


def wait_for_second_session(relay: RelayProcess) -> None:
    deadline = time.monotonic() + 20
    while relay.log().count("streaming from slot") < 2:
        assert time.monotonic() < deadline, relay.log_tail()
        relay.check_alive()
        time.sleep(0.05)

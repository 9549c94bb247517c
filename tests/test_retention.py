"""Background retention (``loops.retain_outbox``, for ``run --retention``) under load.

A real relay streams while writers insert fresh rows and backdated ones (older
than the retention); retention passes run beside it. Nothing is lost (deletes
never reach the relay) and no row older than the retention survives a pass.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from cdc_relay.loops import retain_outbox
from tests.harness import Consumer, RelayProcess, Setup, unique_names

RETENTION = timedelta(hours=1)


def old_rows(outbox: Setup) -> int:
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {outbox.table} WHERE created_at < now() - %s", (RETENTION,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def write(outbox: Setup, ids: list[str], transactions: int) -> None:
    """Each transaction: 20 fresh rows and 20 rows created two hours ago (due for pruning)."""
    with psycopg.connect(outbox.dsn) as conn:
        for t in range(transactions):
            for backdated in (False, True):
                rows = conn.execute(
                    f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type,"
                    " payload, created_at) SELECT 'order', %s || g, 'Created',"
                    " jsonb_build_object('g', g), now() - %s FROM generate_series(1, 20) g"
                    " RETURNING id::text",
                    (f"{t}-{backdated}-", timedelta(hours=2) if backdated else timedelta(0)),
                ).fetchall()
                ids += [r[0] for r in rows]
            conn.commit()


@pytest.mark.asyncio
async def test_retention_under_load_loses_nothing_and_leaves_no_old_row(
    outbox: Setup, consumer: Consumer, tmp_path: Path
) -> None:
    relay = RelayProcess(outbox, tmp_path / "relay.log").start()
    stop = asyncio.Event()
    passes: list[int] = []
    try:
        await relay.wait_for_log_async("streaming from slot")
        retention = asyncio.create_task(
            retain_outbox(
                outbox.settings, RETENTION, stop, interval=0.3, batch=50, on_pass=passes.append
            )
        )
        per_writer: list[list[str]] = [[], [], []]
        writers = [threading.Thread(target=write, args=(outbox, m, 100)) for m in per_writer]
        for w in writers:
            w.start()
        for w in writers:
            await asyncio.to_thread(w.join, 120)
        ids = [i for mine in per_writer for i in mine]
        assert len(ids) == 3 * 100 * 40
        await consumer.wait_for(set(ids), timeout=120)
        pass_count = len(passes)
        await asyncio.wait_for(_until(lambda: len(passes) > pass_count), 30)  # a pass after load
        assert old_rows(outbox) == 0
        assert sum(passes) == len(ids) // 2  # exactly the backdated rows were deleted
    finally:
        stop.set()
        relay.stop_quietly()
    await asyncio.wait_for(retention, 10)


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_failed_pass_is_retried_not_fatal(pg_dsn: str) -> None:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("retf"))
    stop = asyncio.Event()
    passes: list[int] = []
    # The table does not exist yet: the first passes fail, the loop goes on.
    task = asyncio.create_task(
        retain_outbox(setup.settings, RETENTION, stop, interval=0.1, on_pass=passes.append)
    )
    try:
        await asyncio.sleep(0.5)
        assert not task.done() and passes == []
        setup.init()
        await asyncio.wait_for(_until(lambda: len(passes) > 0), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        setup.cleanup()

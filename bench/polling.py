"""The peer: the polling outbox relay a user would write instead of cdc-relay.

    loop:
        BEGIN
        SELECT ... FROM outbox ORDER BY created_at LIMIT B FOR UPDATE SKIP LOCKED
        publish each row (aio-pika, confirms on, all of the batch pipelined)
        wait for every confirm
        DELETE the published ids
        COMMIT
        sleep(poll interval) if the batch was not full

It uses asyncpg (the fastest Python driver) and an index on created_at, and
publishes the same messages cdc-relay would (same properties and headers), so
the comparison is about the approach, not about a handicapped peer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aio_pika
import asyncpg
import psycopg

from bench.env import Phase
from bench.loadproc import read_times
from bench.relayrun import Consumer, latency_result, run_writer
from cdc_relay.schema import outbox_ddl
from devtools.amqp import delete_topology, topology

EXCHANGE = "bench_polling"


def create_table(dsn: str, table: str, copy_from: str | None = None) -> None:
    """An outbox table plus the created_at index a polling relay needs; optionally filled."""
    schema, name = table.split(".", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(outbox_ddl((schema, name)))
        conn.execute(f"CREATE INDEX ON {table} (created_at)")
        if copy_from:
            conn.execute(f"INSERT INTO {table} SELECT * FROM {copy_from}")
            conn.execute(f"VACUUM ANALYZE {table}")


def drop_table(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute("CHECKPOINT")


class PollingRelay:
    """One asyncpg connection, one aio-pika confirm channel."""

    def __init__(self, dsn: str, amqp_url: str, table: str, batch: int) -> None:
        self.dsn, self.amqp_url, self.table, self.batch = dsn, amqp_url, table, batch
        self.select = (
            "SELECT id, aggregate_type, aggregate_id, event_type, payload::text, created_at"
            f" FROM {table} ORDER BY created_at LIMIT {batch} FOR UPDATE SKIP LOCKED"
        )
        self.delete = f"DELETE FROM {table} WHERE id = ANY($1::uuid[])"

    async def __aenter__(self) -> PollingRelay:
        self.pg = await asyncpg.connect(self.dsn)
        self.amqp = await aio_pika.connect(self.amqp_url)
        channel = await self.amqp.channel(publisher_confirms=True)
        self.exchange = await channel.get_exchange(EXCHANGE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pg.close()
        await self.amqp.close()

    async def poll_once(self) -> int:
        """One claim-publish-delete transaction; returns the rows moved."""
        async with self.pg.transaction():
            rows = await self.pg.fetch(self.select)
            if not rows:
                return 0
            confirms = await asyncio.gather(
                *(
                    self.exchange.publish(
                        aio_pika.Message(
                            body=r[4].encode(),
                            message_id=str(r[0]),
                            type=r[3],
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            timestamp=r[5],
                            app_id="polling-relay",
                            headers={
                                "aggregate_type": r[1],
                                "aggregate_id": r[2],
                                "event_type": r[3],
                            },
                        ),
                        routing_key=f"{r[1]}.{r[3]}",
                    )
                    for r in rows
                )
            )
            if any(type(c).__name__ != "Ack" for c in confirms):
                raise RuntimeError("a publish was not acked (returned or nacked)")
            await self.pg.execute(self.delete, [r[0] for r in rows])
        return len(rows)


async def polling_drain(
    dsn: str, amqp_url: str, source_table: str, batch: int, phase: Phase, timeout: float
) -> dict[str, float]:
    """Drain a copy of the backlog; rows/s and this process's CPU per message."""
    table = f"public.bench_poll_{uuid.uuid4().hex[:6]}"
    queue = f"q_{table.split('.')[1]}"
    create_table(dsn, table, source_table)
    await topology(amqp_url, EXCHANGE, queue)
    moved = 0
    async with PollingRelay(dsn, amqp_url, table, batch) as relay:
        cpu_before = time.process_time()
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            n = await relay.poll_once()
            if n == 0:
                break
            moved += n
            phase.note(f"{moved:,} rows published and deleted")
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu_before
        phase.measure_cpu()
    drop_table(dsn, table)
    await delete_topology(amqp_url, queue)
    return {
        "rows": moved,
        "seconds": seconds,
        "rows_per_s": moved / seconds,
        "cpu_us_per_msg": cpu / max(moved, 1) * 1e6,
        "timed_out": float(seconds >= timeout),
    }


async def polling_latency(
    dsn: str,
    amqp_url: str,
    rate: int,
    seconds: float,
    interval: float,
    batch: int,
    workdir: Path,
    phase: Phase,
) -> dict[str, float]:
    """Commit -> consumer receipt for the polling peer at ``rate`` rows/s and a poll interval."""
    table = f"public.bench_poll_{uuid.uuid4().hex[:6]}"
    queue = f"q_{table.split('.')[1]}"
    create_table(dsn, table)
    await topology(amqp_url, EXCHANGE, queue)
    consumer = Consumer(amqp_url, queue, workdir / f"{queue}.recv", seconds + 180)
    out = workdir / f"{queue}.sent"
    try:
        await consumer.ready()
        async with PollingRelay(dsn, amqp_url, table, batch) as relay:
            writer_task = asyncio.create_task(run_writer(dsn, table, rate, seconds, out, phase))
            deadline = time.monotonic() + seconds + 120
            while time.monotonic() < deadline:
                n = await relay.poll_once()
                if writer_task.done() and n == 0:
                    break
                if n < batch:
                    await asyncio.sleep(interval)
            writer = await writer_task
        await consumer.wait_for(int(writer["n"]), 30, phase)
        phase.measure_cpu()
        received = await consumer.stop()
    finally:
        consumer.kill()
    result = latency_result(read_times(out), received, writer, rate)
    result["poll_interval_ms"] = interval * 1e3
    result["batch"] = batch
    for path in (out, consumer.out):
        path.unlink(missing_ok=True)
    drop_table(dsn, table)
    await delete_topology(amqp_url, queue)
    return result

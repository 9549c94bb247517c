"""The measurements behind `make bench`, one function each."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psycopg

from cdc_relay.amqp import Publisher
from cdc_relay.amqp_wire import PublishEncoder
from cdc_relay.config import Settings
from cdc_relay.devservers import PostgresServer, RabbitServer
from cdc_relay.pg import admin
from cdc_relay.router import Envelope

PAD = "x" * 260  # with the other fields, a ~300-byte JSON payload
_T0 = time.monotonic()


class Phase:
    """Progress display: one line when a phase starts and one when it ends."""

    def __init__(self, title: str) -> None:
        self.title = title

    def __enter__(self) -> Phase:
        self.started = time.monotonic()
        print(f"[{time.monotonic() - _T0:6.1f}s] {self.title} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        took = time.monotonic() - self.started
        print(
            f"[{time.monotonic() - _T0:6.1f}s]   done in {took:.1f}s", file=sys.stderr, flush=True
        )


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"n": len(values), "p50_ms": q[49] * 1e3, "p95_ms": q[94] * 1e3, "p99_ms": q[98] * 1e3}


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def wal_lsn(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
    assert row is not None
    return int(row[0])


def confirmed_flush(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Backlog:
    """An outbox table with N committed rows, and slots created before they were written."""

    settings: Settings
    rows: int
    end_lsn: int
    ceiling_slot: str

    def drop(self, dsn: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for slot in (self.settings.slot, self.ceiling_slot):
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = %s AND NOT active",
                    (slot,),
                )
            conn.execute(f"DROP PUBLICATION IF EXISTS {self.settings.publication}")
            conn.execute(f"DROP TABLE IF EXISTS {self.settings.table}")
            conn.execute(f"DROP TABLE IF EXISTS {self.settings.table}_dead_letter")


def new_settings(dsn: str, amqp_url: str = "") -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        dsn=dsn,
        amqp_urls=[amqp_url],
        slot=f"bench_{tag}",
        publication=f"bench_pub_{tag}",
        table=f"public.bench_{tag}",
        exchange=f"bench_ex_{tag}",
    )


INSERT = (
    "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)"
    " SELECT 'order', g::text, 'OrderCreated',"
    " jsonb_build_object('order_id', g, 'pad', %s::text) FROM generate_series(1, %s) g"
)


def insert_backlog(dsn: str, rows: int, txn_size: int) -> Backlog:
    settings = new_settings(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        admin.init(conn, settings)
        ceiling_slot = settings.slot + "_ceiling"
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (ceiling_slot,))
        statement = INSERT.format(table=settings.table)
        with conn.pipeline():
            for _ in range(rows // txn_size):
                conn.execute(statement, (PAD, txn_size))
    return Backlog(settings, rows, wal_lsn(dsn), ceiling_slot)


def pg_ceiling(pg: PostgresServer, backlog: Backlog) -> dict[str, float]:
    """pg_recvlogical decoding the same backlog with pgoutput, output to /dev/null."""
    end = f"{backlog.end_lsn >> 32:X}/{backlog.end_lsn & 0xFFFFFFFF:X}"
    started = time.monotonic()
    subprocess.run(
        [
            str(pg.bindir / "pg_recvlogical"),
            "-d",
            pg.dsn,
            "--slot",
            backlog.ceiling_slot,
            "--start",
            "--endpos",
            end,
            "--no-loop",
            "-o",
            "proto_version=1",
            "-o",
            f"publication_names={backlog.settings.publication}",
            "-f",
            "/dev/null",
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    seconds = time.monotonic() - started
    return {"rows": backlog.rows, "seconds": seconds, "rows_per_s": backlog.rows / seconds}


async def broker_ceiling(amqp_url: str, kind: str, n: int) -> dict[str, float]:
    """Pre-encoded persistent messages written in bulk; acks counted (multiple included)."""
    queue = f"bench_ceiling_{kind}_{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": kind})
        publisher = Publisher([amqp_url], on_confirm=lambda _s: None, on_failure=lambda *_: None)
        await publisher.connect()
        acked = 0
        done = asyncio.Event()
        progress = asyncio.Event()

        def on_frame(_channel: int, value: Any) -> None:
            nonlocal acked
            if type(value).__name__ == "Ack":
                acked = value.delivery_tag
                progress.set()
                if acked >= n:
                    done.set()

        publisher.frame_received = on_frame  # type: ignore[method-assign]
        encoder = PublishEncoder(1, 131072)
        body = orjson.dumps({"order_id": 1, "pad": PAD})
        frame = encoder.encode(
            Envelope(
                exchange="",
                routing_key=queue,
                body=body,
                message_id="m",
                type="OrderCreated",
                headers={},
            )
        )
        window = 4000
        started = time.monotonic()
        sent = 0
        deadline = started + 120
        while sent < n and time.monotonic() < deadline:
            chunk = min(window - (sent - acked), n - sent)
            if chunk > 0:
                publisher._write_now(frame * chunk)
                sent += chunk
            await asyncio.sleep(0)
        await asyncio.wait_for(done.wait(), 120)
        seconds = time.monotonic() - started
        await publisher.close()
        await channel.queue_delete(queue)
    return {"messages": n, "seconds": seconds, "msgs_per_s": n / seconds}


def relay_process(settings: Settings, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "cdc_relay.cli",
        "run",
        "--dsn",
        settings.dsn,
        "--amqp-url",
        settings.amqp_urls[0],
        "--slot",
        settings.slot,
        "--publication",
        settings.publication,
        "--table",
        settings.table,
        "--exchange",
        settings.exchange,
        "--log-level",
        "WARNING",
        *extra,
    ]
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


async def bind_queue(amqp_url: str, exchange: str) -> str:
    queue = f"q_{exchange}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, "topic", durable=True)
        q = await channel.declare_queue(queue, durable=True)
        await q.bind(ex, "#")
    return queue


async def delete_queue(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


async def relay_drain(pg: PostgresServer, mq: RabbitServer, backlog: Backlog) -> dict[str, float]:
    settings = backlog.settings
    settings.amqp_urls = [mq.amqp_url]
    queue = await bind_queue(mq.amqp_url, settings.exchange)
    log = Path(f"bench-results/relay-{settings.slot}.log")
    log.parent.mkdir(exist_ok=True)
    proc = relay_process(settings, log)
    started = time.monotonic()
    try:
        deadline = started + 600
        while confirmed_flush(pg.dsn, settings.slot) < backlog.end_lsn - 4096:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"relay did not drain the backlog; see {log}")
            await asyncio.sleep(0.02)
        seconds = time.monotonic() - started
        cpu = proc_cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    await delete_queue(mq.amqp_url, queue)
    return {
        "rows": backlog.rows,
        "seconds": seconds,
        "rows_per_s": backlog.rows / seconds,
        "cpu_us_per_msg": cpu / backlog.rows * 1e6,
    }


async def polling_drain(dsn: str, amqp_url: str, backlog: Backlog, batch: int) -> dict[str, float]:
    """The relay a user would write instead: claim a batch, publish with confirms, delete."""
    table = backlog.settings.table
    copy = f"{table}_poll"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {copy}")
        conn.execute(f"CREATE TABLE {copy} AS SELECT * FROM {table}")
        conn.execute(f"ALTER TABLE {copy} ADD PRIMARY KEY (id)")
        conn.execute(f"CREATE INDEX ON {copy} (created_at)")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange("bench_poll", "topic", durable=True)
        queue = await channel.declare_queue(f"bench_poll_{uuid.uuid4().hex[:6]}", durable=True)
        await queue.bind(exchange, "#")
        aconn = await psycopg.AsyncConnection.connect(dsn)
        started = time.monotonic()
        moved = await _poll_until_empty(aconn, exchange, copy, batch, started + 600)
        seconds = time.monotonic() - started
        await aconn.close()
        await queue.delete(if_unused=False, if_empty=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {copy}")
    return {"rows": moved, "seconds": seconds, "rows_per_s": moved / seconds}


async def _poll_once(
    aconn: psycopg.AsyncConnection[Any], exchange: Any, table: str, batch: int
) -> tuple[int, list[float]]:
    async with aconn.transaction():
        cur = await aconn.execute(
            f"SELECT id, aggregate_type, event_type, payload::text, created_at FROM {table}"
            f" ORDER BY created_at LIMIT {batch} FOR UPDATE SKIP LOCKED"
        )
        rows = await cur.fetchall()
        if not rows:
            return 0, []
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        body=r[3].encode(),
                        message_id=str(r[0]),
                        type=r[2],
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=f"{r[1]}.{r[2]}",
                )
                for r in rows
            )
        )
        await aconn.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", ([r[0] for r in rows],))
    return len(rows), [r[4].timestamp() for r in rows]


async def _poll_until_empty(
    aconn: psycopg.AsyncConnection[Any], exchange: Any, table: str, batch: int, deadline: float
) -> int:
    moved = 0
    while time.monotonic() < deadline:
        n, _ = await _poll_once(aconn, exchange, table, batch)
        if n == 0:
            return moved
        moved += n
    return moved


class PacedWriter(threading.Thread):
    """Single-row transactions at a fixed rate; records wall time after each COMMIT."""

    def __init__(self, dsn: str, table: str, rate: float, seconds: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.table, self.rate, self.seconds = dsn, table, rate, seconds
        self.committed: dict[str, float] = {}

    def run(self) -> None:
        statement = (
            f"INSERT INTO {self.table} (aggregate_type, aggregate_id, event_type, payload)"
            " VALUES ('order', '1', 'OrderCreated', jsonb_build_object('pad', %s::text))"
            " RETURNING id::text"
        )
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            started = time.monotonic()
            n = 0
            while True:
                now = time.monotonic()
                if now - started >= self.seconds:
                    return
                due = started + n / self.rate
                if due > now:
                    time.sleep(due - now)
                row = conn.execute(statement, (PAD,)).fetchone()
                assert row is not None
                self.committed[row[0]] = time.time()
                n += 1


async def _consume_times(amqp_url: str, queue: str, received: dict[str, float]) -> Any:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=5000)
    q = await channel.get_queue(queue)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received[message.message_id or ""] = time.time()
        await message.ack()

    await q.consume(on_message)
    return connection


def _read_times(path: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                key, value = line.split()
                times[key] = float(value)
    return times


async def live_latency(
    pg: PostgresServer, mq: RabbitServer, rate: int, seconds: float
) -> dict[str, float]:
    """Commit to delivery (>= commit to confirm) while the relay runs, at a fixed rate.

    Writers (two, each at half the rate) and the consumer are separate processes.
    """
    settings = new_settings(pg.dsn, mq.amqp_url)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        admin.init(conn, settings)
    queue = await bind_queue(mq.amqp_url, settings.exchange)
    base = Path(f"bench-results/{settings.slot}")
    proc = relay_process(settings, Path(f"{base}-relay.log"))
    loadproc = [sys.executable, "-m", "bench.loadproc"]
    consumer_out = Path(f"{base}-consumer.txt")
    consumer = subprocess.Popen(
        [
            *loadproc,
            "consumer",
            "--url",
            mq.amqp_url,
            "--queue",
            queue,
            "--seconds",
            str(seconds + 8),
            "--out",
            str(consumer_out),
        ]
    )
    try:
        ready = Path(str(consumer_out) + ".ready")
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        writer_outs = [Path(f"{base}-writer{i}.txt") for i in range(2)]
        writers = [
            subprocess.Popen(
                [
                    *loadproc,
                    "writer",
                    "--dsn",
                    pg.dsn,
                    "--table",
                    settings.table,
                    "--rate",
                    str(rate / 2),
                    "--seconds",
                    str(seconds),
                    "--out",
                    str(out),
                ]
            )
            for out in writer_outs
        ]
        for w in writers:
            await asyncio.to_thread(w.wait, seconds + 60)
        await asyncio.to_thread(consumer.wait, seconds + 60)
    finally:
        for p in (consumer, proc):
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    committed: dict[str, float] = {}
    for out in writer_outs:
        committed.update(_read_times(out))
    received = _read_times(consumer_out)
    latencies = [received[k] - t for k, t in committed.items() if k in received]
    result = percentiles(latencies)
    result["achieved_rate"] = len(committed) / seconds
    result["missing"] = len(committed) - len(latencies)
    await delete_queue(mq.amqp_url, queue)
    Backlog(settings, 0, 0, "none").drop(pg.dsn)
    return result


async def polling_latency(
    dsn: str, amqp_url: str, rate: int, seconds: float, interval: float
) -> dict[str, float]:
    """The polling peer's commit-to-publish-confirm latency at a fixed poll interval."""
    settings = new_settings(dsn, amqp_url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        admin.init(conn, settings)
    writer = PacedWriter(dsn, settings.table, rate, seconds)
    confirmed: dict[str, float] = {}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange("bench_poll", "topic", durable=True)
        aconn = await psycopg.AsyncConnection.connect(dsn)
        writer.start()
        deadline = time.monotonic() + seconds + 30
        while time.monotonic() < deadline:
            async with aconn.transaction():
                cur = await aconn.execute(
                    f"SELECT id::text, payload::text FROM {settings.table}"
                    " ORDER BY created_at LIMIT 1000 FOR UPDATE SKIP LOCKED"
                )
                rows = await cur.fetchall()
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(body=r[1].encode(), message_id=r[0]), "order.x"
                        )
                        for r in rows
                    )
                )
                now = time.time()
                for r in rows:
                    confirmed[r[0]] = now
                if rows:
                    await aconn.execute(
                        f"DELETE FROM {settings.table} WHERE id = ANY(%s::uuid[])",
                        ([r[0] for r in rows],),
                    )
            if not writer.is_alive() and not rows:
                break
            await asyncio.sleep(interval)
        await aconn.close()
    latencies = [confirmed[k] - t for k, t in writer.committed.items() if k in confirmed]
    Backlog(settings, 0, 0, "none").drop(dsn)
    return percentiles(latencies)


async def relay_peak_rss(pg: PostgresServer, mq: RabbitServer, rows: int) -> dict[str, float]:
    settings = new_settings(pg.dsn, mq.amqp_url)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        admin.init(conn, settings)
        conn.execute(INSERT.format(table=settings.table), (PAD[:20], rows))
    end = wal_lsn(pg.dsn)
    queue = await bind_queue(mq.amqp_url, settings.exchange)
    log = Path(f"bench-results/relay-{settings.slot}.log")
    proc = relay_process(settings, log)
    started = time.monotonic()
    try:
        deadline = started + 900
        while confirmed_flush(pg.dsn, settings.slot) < end - 4096:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"relay did not deliver the transaction; see {log}")
            await asyncio.sleep(0.2)
        seconds = time.monotonic() - started
        peak = proc_kb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    await delete_queue(mq.amqp_url, queue)
    Backlog(settings, 0, 0, "none").drop(pg.dsn)
    return {
        "rows": rows,
        "seconds": seconds,
        "peak_rss_mb": peak / 1024,
        "rows_per_s": rows / seconds,
    }

"""The fault-suite workload: concurrent writers, a recording consumer, and the verdict.

The outbox table itself is the source of truth for what was committed (a commit
interrupted by a crash may or may not have happened), so the verdict reads the
committed ids back from Postgres rather than trusting the writers.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from devtools.metrics import readyz
from devtools.servers import RabbitServer
from tests.harness import Consumer, Setup, wait_until


@dataclass
class Workload:
    """Writer threads inserting single- and multi-row transactions over several aggregates."""

    setup: Setup
    total_rows: int
    writers: int = 4
    aggregates_per_writer: int = 3
    rows_per_second: float = 3000.0
    max_seconds: float = 120.0
    errors: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Workload:
        per_writer = self.total_rows // self.writers
        for w in range(self.writers):
            thread = threading.Thread(target=self._write, args=(w, per_writer), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _write(self, writer: int, rows: int) -> None:
        rng = random.Random(writer)
        seqs = collections.Counter[str]()
        written = 0
        deadline = time.monotonic() + self.max_seconds
        pace = self.writers / self.rows_per_second
        conn: psycopg.Connection[Any] | None = None
        while written < rows and time.monotonic() < deadline and not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.setup.dsn, connect_timeout=3)
                size = min(rng.choice([1, 1, 1, 3, 10, 50]), rows - written)
                aggregate = f"w{writer}a{rng.randrange(self.aggregates_per_writer)}"
                batch = []
                for _ in range(size):
                    batch.append(
                        {
                            "aggregate_type": "fault",
                            "aggregate_id": aggregate,
                            "payload": {"agg": aggregate, "seq": seqs[aggregate], "pad": "p" * 64},
                        }
                    )
                    seqs[aggregate] += 1
                self.setup.insert(conn, batch)
                conn.commit()
                written += size
                time.sleep(pace * size)
            except psycopg.Error:
                # Server down or restarting: the transaction may or may not
                # have committed; the verdict reads the truth from the table.
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.2)
        if conn is not None:
            conn.close()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    async def wait(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not self.done():
            if time.monotonic() > deadline:
                self._stop.set()
                raise AssertionError("writers did not finish in time")
            await asyncio.sleep(0.1)


def committed_rows(setup: Setup) -> dict[str, tuple[str, int]]:
    with psycopg.connect(setup.dsn) as conn:
        rows = conn.execute(
            f"SELECT id::text, payload->>'agg', (payload->>'seq')::int FROM {setup.table}"
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


@dataclass
class Verdict:
    committed: int
    delivered_unique: int
    lost: int
    duplicates: int
    seconds_to_catch_up: float

    def row(self, name: str) -> str:
        return (
            f"{name}: committed={self.committed} lost={self.lost} "
            f"duplicates={self.duplicates} catch-up={self.seconds_to_catch_up:.1f}s"
        )


async def verify(setup: Setup, consumer: Consumer, timeout: float = 120) -> Verdict:
    """Every committed row delivered, nothing else, per-aggregate order, slot caught up."""
    started = time.monotonic()
    committed = committed_rows(setup)
    await consumer.wait_for(set(committed), timeout=timeout)
    deadline = time.monotonic() + 30
    while setup.confirmed_lag() > 64 * 1024 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    caught_up = time.monotonic() - started
    lag = setup.confirmed_lag()
    assert lag <= 64 * 1024, f"slot did not catch up: {lag} bytes behind"
    await consumer.settle(quiet=1.0)
    counts = collections.Counter(consumer.ids())
    extra = set(counts) - set(committed)
    assert not extra, f"{len(extra)} delivered rows were never committed (rolled back?)"
    # Per-aggregate order of first deliveries follows the writers' sequence.
    seen: set[str] = set()
    last: dict[str, int] = {}
    for delivery in consumer.deliveries:
        if delivery.message_id in seen:
            continue
        seen.add(delivery.message_id)
        body = orjson.loads(delivery.body)
        agg, seq = body["agg"], body["seq"]
        assert seq > last.get(agg, -1), f"aggregate {agg}: seq {seq} after {last[agg]}"
        last[agg] = seq
    return Verdict(
        committed=len(committed),
        delivered_unique=len(counts),
        lost=len(set(committed) - set(counts)),
        duplicates=sum(c - 1 for c in counts.values()),
        seconds_to_catch_up=caught_up,
    )


async def bounce_broker(rabbit: RabbitServer, metrics_port: int, times: int) -> None:
    """Stop and start the broker ``times`` times while a relay with /readyz on the port runs.

    Readiness must drop during each outage and come back after it.
    """
    for _ in range(times):
        await asyncio.sleep(1.5)
        await asyncio.to_thread(rabbit.stop)
        ready = await wait_until(lambda: readyz(metrics_port) == 503, 15)
        assert ready, "readiness missed the outage"
        await asyncio.sleep(1.0)
        await asyncio.to_thread(rabbit.start)
        back = await wait_until(lambda: readyz(metrics_port) == 200, 60)
        assert back, "relay did not come back"

"""`python -m bench.slots`: what N outbox partitions, each with its own slot and relay, give.

For N in 1, 2, 4 (``--partitions``): N outbox tables, each with its own
publication, slot, exchange, durable queue and ``cdc-relay run``; the relays
stream and are ready, then ``--rows`` rows are committed server-side in
``--txn``-row transactions, interleaved over the N tables (transaction k goes
to table k mod N, as hashing aggregate_id spreads them). Measured: time until
every slot is confirmed past the last commit (rows/s), the CPU of the
walsenders (each decodes ALL the WAL, whichever table it is for), of the relays,
of RabbitMQ, and what else ran on the machine. Own throwaway servers, bounded
counts and times, one markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psycopg

from bench.env import CpuMeter, log, machine, proc_cpu_seconds
from bench.loadproc import PAD
from bench.pgside import LSN_SLACK, SlotWatch, drop_outbox, init_outbox, lsn_int, server_version
from cdc_relay.config import Settings
from devtools import amqp
from devtools.relayproc import RelayProcess
from devtools.servers import PostgresServer, RabbitServer, free_port

# Transaction k goes to table k mod N: the rows of one aggregate would all land
# in one table (hash of aggregate_id), and tables take turns in the WAL.
FILL_INTERLEAVED = """
CREATE OR REPLACE PROCEDURE bench_fill_interleaved(tbls regclass[], n int, per_txn int, pad text)
LANGUAGE plpgsql AS $$
DECLARE
    i int := 0;
    k int := 0;
BEGIN
    WHILE i < n LOOP
        EXECUTE format(
            'INSERT INTO %s (aggregate_type, aggregate_id, event_type, payload)'
            ' SELECT ''order'', g::text, ''OrderCreated'','
            ' jsonb_build_object(''order_id'', 1000000 + g, ''pad'', $1)'
            ' FROM generate_series($2, $3) g', tbls[1 + k % array_length(tbls, 1)])
        USING pad, i + 1, least(i + per_txn, n);
        COMMIT;
        i := i + per_txn;
        k := k + 1;
    END LOOP;
END $$
"""


@dataclass
class Partition:
    settings: Settings
    relay: RelayProcess | None = None

    @property
    def queue(self) -> str:
        return f"q_{self.settings.exchange}"


def partitions(dsn: str, amqp_url: str, count: int) -> list[Partition]:
    tag = uuid.uuid4().hex[:6]
    return [
        Partition(
            Settings(
                dsn=dsn,
                amqp_urls=[amqp_url],
                slot=f"slots_{tag}_p{i}",
                publication=f"slots_pub_{tag}_p{i}",
                table=f"public.slots_{tag}_p{i}",
                exchange=f"slots_ex_{tag}_p{i}",
            )
        )
        for i in range(count)
    ]


def walsender_pids(dsn: str, slots: list[str]) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = ANY(%s)", (slots,)
        ).fetchall()
    return [int(r[0]) for r in rows if r[0] is not None]


async def measure(
    pg: PostgresServer, mq: RabbitServer, count: int, rows: int, txn: int, workdir: Path
) -> dict[str, Any]:
    """One configuration: N partitions drained concurrently from a live start."""
    parts = partitions(pg.dsn, mq.amqp_url, count)
    watches: list[SlotWatch] = []
    try:
        for part in parts:
            init_outbox(part.settings)
            await amqp.topology(mq.amqp_url, part.settings.exchange, part.queue)
            part.relay = RelayProcess(
                part.settings,
                workdir / f"{part.settings.slot}.log",
                log_level="WARNING",
                stats_interval=None,
                metrics_port=free_port(),
            ).start()
        for part in parts:
            assert part.relay is not None
            await part.relay.wait_ready(60)
        senders = walsender_pids(pg.dsn, [p.settings.slot for p in parts])
        assert len(senders) == count, f"{len(senders)} walsenders for {count} slots"
        relays = [p.relay.pid for p in parts if p.relay is not None]
        watches = [SlotWatch(pg.dsn, p.settings.slot) for p in parts]
        roots = {"postgres": pg.postmaster_pid, "rabbitmq": mq.beam_pid}
        roots.update({f"relay{i}": pid for i, pid in enumerate(relays)})
        meter = CpuMeter(lambda: roots)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(FILL_INTERLEAVED)
            start = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert start is not None
            before = meter.snapshot()
            sender_cpu = sum(proc_cpu_seconds(pid) for pid in senders)
            relay_cpu = sum(proc_cpu_seconds(pid) for pid in relays)
            started = time.monotonic()
            tables = [p.settings.table for p in parts]
            conn.execute(
                "CALL bench_fill_interleaved(%s::regclass[], %s, %s, %s)", (tables, rows, txn, PAD)
            )
            filled = time.monotonic() - started
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
            end_lsn = lsn_int(row[0])
        deadline = started + 120
        while not all(w.confirmed() >= end_lsn - LSN_SLACK for w in watches):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} relays did not drain {rows} rows in 120 s")
            for part in parts:
                assert part.relay is not None
                part.relay.check_alive()
            await asyncio.sleep(0.01)
        seconds = time.monotonic() - started
        sender_cpu = sum(proc_cpu_seconds(pid) for pid in senders) - sender_cpu
        relay_cpu = sum(proc_cpu_seconds(pid) for pid in relays) - relay_cpu
        cores = CpuMeter.cores(before, meter.snapshot())
        queued = [await amqp.queue_depth(mq.amqp_url, p.queue) for p in parts]
        if sum(queued) < rows:
            raise RuntimeError(f"slots confirmed but only {sum(queued)} of {rows} queued")
        return {
            "slots": count,
            "rows": rows,
            "fill_s": filled,
            "seconds": seconds,
            "rows_per_s": rows / seconds,
            "walsender_cpu_s": sender_cpu,
            "walsender_us_per_row": sender_cpu / rows * 1e6,
            "relay_cpu_s": relay_cpu,
            "rabbitmq_cores": cores.get("rabbitmq", 0.0),
            "other_cores": cores.get("other", 0.0),
            "postgres_cores": cores.get("postgres", 0.0),
            "wal_mb": (end_lsn - lsn_int(start[0])) / 1e6,
        }
    finally:
        for watch in watches:
            watch.close()
        for part in parts:
            if part.relay is not None:
                part.relay.stop(30)
        for part in parts:
            with contextlib.suppress(Exception):
                drop_outbox(part.settings)
            with contextlib.suppress(Exception):
                await amqp.delete_topology(mq.amqp_url, part.queue, part.settings.exchange)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| slots/relays | rows (WAL) | drain | rows/s | walsender CPU (all) | per row | "
        "relay CPU (all) | Postgres (all) | RabbitMQ | other load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['slots']} | {r['rows']:,} ({r['wal_mb']:.0f} MB) | {r['seconds']:.2f} s | "
            f"{r['rows_per_s']:,.0f} | "
            f"{r['walsender_cpu_s']:.2f} s | {r['walsender_us_per_row']:.1f} µs | "
            f"{r['relay_cpu_s']:.2f} s | {r['postgres_cores']:.2f} cores | "
            f"{r['rabbitmq_cores']:.2f} cores | "
            f"{r['other_cores']:.2f} cores |"
        )
    return "\n".join(lines)


async def run(counts: list[int], rows: int, txn: int) -> list[dict[str, Any]]:
    results = []
    with (
        TemporaryDirectory(prefix="bench-slots-") as tmp,
        PostgresServer() as pg,
        RabbitServer() as mq,
    ):
        log(f"PostgreSQL {server_version(pg.dsn)}, RabbitMQ on port {mq.port}")
        for count in counts:
            log(f"{count} slot(s): {rows:,} rows in {txn}-row transactions ...")
            result = await measure(pg, mq, count, rows, txn, Path(tmp))
            log(
                f"  {result['rows_per_s']:,.0f} rows/s, walsenders {result['walsender_cpu_s']:.2f}s"
            )
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.slots", description=__doc__)
    parser.add_argument("--partitions", default="1,2,4", help="comma-separated slot counts")
    parser.add_argument("--rows", type=int, default=40_000, help="rows per configuration")
    parser.add_argument("--txn", type=int, default=10, help="rows per transaction")
    args = parser.parse_args()
    counts = [int(c) for c in args.partitions.split(",")]
    info = machine()
    results = asyncio.run(run(counts, args.rows, args.txn))
    print(
        f"bench.slots: {info.get('cpu', '?')}, {info.get('cores', '?')} cores; "
        f"{args.rows:,} rows of 300 bytes in {args.txn}-row transactions per configuration; "
        f"load average at start {' / '.join(info.get('loadavg_at_start', []))}"
    )
    print(table(results))
    sys.exit(0)


if __name__ == "__main__":
    main()

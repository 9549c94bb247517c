"""TLS against plain TCP: backlog drain, steady latency and bursts (issue 10).

``python -m bench.tls [--quick]`` starts a plain and a TLS-only Postgres and RabbitMQ
(trustme certificates, ``sslmode=verify-full`` and ``amqps://...?cacertfile=``) and
runs the relay with each of the four combinations. For each: the drain rate of a
backlog of single-row transactions with the relay's CPU per message, and the
relay's own commit-to-confirm histogram (``/metrics``) under a paced writer and
under bursts of back-to-back commits (where a reader stalled on bytes OpenSSL had
already decrypted would show up in p99). Prints a markdown table.

``make bench`` measures two of the combinations (verify-full / amqps and the
plain / plain baseline) with the same functions (``tls_only_servers``,
``targets``, ``compare``), on its own plain servers and a TLS-only pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import psycopg

from bench.env import Phase, log, proc_cpu_seconds
from bench.pgside import LSN_SLACK, SlotWatch, drop_outbox, drop_slots, init_outbox, new_settings
from bench.pgside import make_backlog as make_pg_backlog
from bench.relayrun import COMMIT_TO_CONFIRM, histogram_result, run_writer, start_relay
from cdc_relay.amqp import declare_exchange
from devtools import amqp
from devtools.servers import PostgresServer, RabbitServer
from devtools.tls import make_tls_files

FULL = {"rows": 50_000, "rate": 2000, "seconds": 10.0, "bursts": 40, "burst": 200}
QUICK = {"rows": 10_000, "rate": 1000, "seconds": 5.0, "bursts": 15, "burst": 200}
BURST_GAP = 0.25  # seconds between bursts: the stream goes quiet, then a burst lands
PLAIN = "plain / plain"
BOTH = "verify-full / amqps"  # the combination `make bench` measures next to PLAIN


@dataclass(frozen=True)
class Target:
    """One combination: where the relay connects, and how aio-pika (the bench) connects."""

    label: str
    dsn: str
    amqp_url: str

    @property
    def bench_amqp_url(self) -> str:
        """aio-pika names RabbitMQ's ``cacertfile`` parameter ``cafile``."""
        return self.amqp_url.replace("cacertfile=", "cafile=")


async def topology(target: Target, exchange: str, queue: str) -> None:
    """The exchange as the relay declares it (its URL), a queue bound to it (aio-pika's)."""
    await declare_exchange([target.amqp_url], exchange)
    connection = await aio_pika.connect(target.bench_amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind(exchange, "#")


async def drain(target: Target, rows: int, workdir: Path) -> dict[str, float]:
    """Seconds from /readyz to the slot confirmed past a backlog of ``rows`` 1-row commits."""
    settings = new_settings(target.dsn, target.amqp_url, "tlsdrain")
    backlog = await asyncio.to_thread(make_pg_backlog, settings, rows, 1)
    await asyncio.to_thread(drop_slots, target.dsn, backlog.ceiling_slot)
    queue = f"q_{settings.exchange}"
    await topology(target, settings.exchange, queue)
    proc = start_relay(settings, workdir)
    watch = SlotWatch(target.dsn, settings.slot)
    try:
        await proc.wait_ready()
        cpu = proc_cpu_seconds(proc.pid)
        while watch.confirmed() < backlog.end_lsn - LSN_SLACK:
            proc.check_alive()
            if time.monotonic() - proc.ready_at > 600:
                raise RuntimeError(f"no drain in 600s: {proc.log_tail()}")
            await asyncio.sleep(0.01)
        seconds = time.monotonic() - proc.ready_at
        cpu = proc_cpu_seconds(proc.pid) - cpu
        queued = await amqp.queue_depth(target.bench_amqp_url, queue)
    finally:
        watch.close()
        proc.stop()
        await amqp.delete_topology(target.bench_amqp_url, queue, settings.exchange)
        await asyncio.to_thread(backlog.drop)
    if queued < rows:
        raise RuntimeError(f"only {queued} of {rows} messages queued")
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "cpu_us_per_msg": cpu / rows * 1e6,
    }


def burst_writer(dsn: str, table: str, bursts: int, size: int) -> int:
    """``bursts`` times: ``size`` single-row transactions back to back, then a pause."""
    insert = (
        f"INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)"
        " VALUES ('order', %s, 'Burst', '{\"pad\": \"" + "x" * 200 + "\"}')"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for b in range(bursts):
            for i in range(size):
                conn.execute(insert, (f"{b}-{i}",))
            time.sleep(BURST_GAP)
    return bursts * size


async def latency(target: Target, sizes: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Commit-to-confirm under a paced writer, then under bursts (the relay's histogram)."""
    settings = new_settings(target.dsn, target.amqp_url, "tlslat")
    await asyncio.to_thread(init_outbox, settings)
    queue = f"q_{settings.exchange}"
    await topology(target, settings.exchange, queue)
    proc = start_relay(settings, workdir)
    result: dict[str, Any] = {}
    try:
        await proc.wait_ready()

        async def observed(write: Any) -> dict[str, float]:
            before = await proc.histogram(COMMIT_TO_CONFIRM)
            n = await write()
            for _ in range(200):  # the last confirms trail the last commit a little
                seen = histogram_result(before, await proc.histogram(COMMIT_TO_CONFIRM))
                if seen["n"] >= n:
                    return seen
                await asyncio.sleep(0.05)
            raise RuntimeError(f"only {seen['n']:.0f} of {n} confirmed: {proc.log_tail()}")

        out = workdir / f"{settings.slot}.sent"

        async def paced() -> int:
            with Phase(f"  {target.label}: {sizes['rate']}/s", measure=False) as phase:
                summary = await run_writer(
                    target.dsn, settings.table, sizes["rate"], sizes["seconds"], out, phase
                )
            return int(summary["n"])

        async def bursty() -> int:
            return await asyncio.to_thread(
                burst_writer, target.dsn, settings.table, sizes["bursts"], sizes["burst"]
            )

        result["paced"] = await observed(paced)
        result["bursts"] = await observed(bursty)
        proc.check_alive()
    finally:
        proc.stop()
        out.unlink(missing_ok=True)
        await amqp.delete_topology(target.bench_amqp_url, queue, settings.exchange)
        await asyncio.to_thread(drop_outbox, settings)
    return result


def table(results: dict[str, dict[str, Any]], sizes: dict[str, Any]) -> str:
    lines = [
        f"| Postgres / RabbitMQ | drain ({sizes['rows']:,} 1-row txns) | CPU/msg "
        f"| commit-to-confirm at {sizes['rate']:,}/s p50 / p99 "
        f"| bursts of {sizes['burst']} commits p50 / p99 |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:80]} | | | |")
            continue
        d, p, b = r["drain"], r["latency"]["paced"], r["latency"]["bursts"]
        lines.append(
            f"| {label} | {d['rows_per_s']:,.0f} rows/s | {d['cpu_us_per_msg']:.0f} µs "
            f"| {p['p50_ms']:.1f} / {p['p99_ms']:.1f} ms "
            f"| {b['p50_ms']:.1f} / {b['p99_ms']:.1f} ms |"
        )
    return "\n".join(lines)


@asynccontextmanager
async def running(*servers: PostgresServer | RabbitServer) -> AsyncIterator[None]:
    """Start the servers in parallel; remove every one at the end, after a failed start too."""
    try:
        with Phase(f"starting {len(servers)} throwaway servers", measure=False):
            started = await asyncio.gather(
                *(asyncio.to_thread(s.start) for s in servers), return_exceptions=True
            )
        for outcome in started:  # raised only once every start has finished
            if isinstance(outcome, BaseException):
                raise outcome
        yield
    finally:
        for server in servers:
            server.cleanup()


@asynccontextmanager
async def tls_only_servers(workdir: Path) -> AsyncIterator[tuple[PostgresServer, RabbitServer]]:
    """A TLS-only Postgres and RabbitMQ with fresh trustme certificates, all removed after."""
    pki = workdir / "pki"
    files = make_tls_files(pki)
    pg, mq = PostgresServer(ssl=files), RabbitServer(tls=files)
    try:
        async with running(pg, mq):
            yield pg, mq
    finally:
        shutil.rmtree(pki, ignore_errors=True)


def targets(
    pg: PostgresServer, mq: RabbitServer, pg_tls: PostgresServer, mq_tls: RabbitServer
) -> dict[str, Target]:
    """The four combinations of a plain and a TLS-only server of each kind, by label."""
    return {
        t.label: t
        for t in (
            Target(PLAIN, pg.dsn, mq.amqp_url),
            Target("verify-full / plain", pg_tls.dsn, mq.amqp_url),
            Target("plain / amqps", pg.dsn, mq_tls.amqp_url),
            Target(BOTH, pg_tls.dsn, mq_tls.amqp_url),
        )
    }


async def measure(target: Target, sizes: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Drain, then paced and bursty latency; a failure is recorded so the next one still runs."""
    with Phase(f"{target.label}: drain, paced and bursty latency", measure=False):
        try:
            return {
                "drain": await drain(target, sizes["rows"], workdir),
                "latency": await latency(target, sizes, workdir),
            }
        except Exception as exc:
            log(f"  failed: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}


async def compare(
    chosen: list[Target], sizes: dict[str, Any], workdir: Path
) -> dict[str, dict[str, Any]]:
    """Each combination measured the same way, one right after the other."""
    return {target.label: await measure(target, sizes, workdir) for target in chosen}


async def run(sizes: dict[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    """All four combinations: a plain and a TLS-only server of each kind."""
    pg, mq = PostgresServer(), RabbitServer()
    async with tls_only_servers(workdir) as (pg_tls, mq_tls), running(pg, mq):
        return await compare(list(targets(pg, mq, pg_tls, mq_tls).values()), sizes, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    workdir = Path(tempfile.mkdtemp(prefix="cdc-relay-bench-tls-"))
    try:
        results = asyncio.run(run(sizes, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "results": results}, indent=2) + "\n")
    print(table(results, sizes))
    sys.exit(1 if any("error" in r for r in results.values()) else 0)


if __name__ == "__main__":
    main()

"""`make bench`: ceilings, a polling peer and cdc-relay, measured in one run.

Everything runs on throwaway local servers (loopback only) started here; every
load loop is bounded in count and time. Prints one table (markdown) and writes
it as JSON to bench-results/. `--quick` is a one-to-two-minute version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.measure import (
    Phase,
    broker_ceiling,
    insert_backlog,
    live_latency,
    pg_ceiling,
    polling_drain,
    polling_latency,
    relay_drain,
    relay_peak_rss,
)
from cdc_relay.devservers import PostgresServer, RabbitServer


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


def server_versions(pg: PostgresServer, mq: RabbitServer) -> dict[str, str]:
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    rabbit = mq.ctl("version").strip().splitlines()[-1]
    return {"postgres": row[0] if row else "?", "rabbitmq": rabbit}


async def run(quick: bool) -> dict[str, Any]:
    n_backlog = 20_000 if quick else 100_000
    n_ceiling = 20_000 if quick else 100_000
    big = 100_000 if quick else 1_000_000
    seconds = 4.0 if quick else 12.0
    rates = [500, 2000, 5000]
    results: dict[str, Any] = {"quick": quick, "machine": machine()}
    pg = PostgresServer()
    mq = RabbitServer()
    try:
        with Phase("starting throwaway Postgres and RabbitMQ"):
            pg.start()
            mq.start()
        results["servers"] = server_versions(pg, mq)
        results["servers"]["postgres_settings"] = "fsync=off, synchronous_commit=on (throwaway)"

        with Phase(f"broker ceiling: {n_ceiling} persistent 300-byte messages, classic+quorum"):
            results["broker_classic"] = await broker_ceiling(mq.amqp_url, "classic", n_ceiling)
            results["broker_quorum"] = await broker_ceiling(mq.amqp_url, "quorum", n_ceiling)

        for txn in (1, 100):
            key = f"txn{txn}"
            with Phase(f"backlog of {n_backlog} rows in {txn}-row transactions"):
                backlog = insert_backlog(pg.dsn, n_backlog, txn)
            with Phase("Postgres ceiling: pg_recvlogical drains the backlog"):
                results[f"pg_ceiling_{key}"] = pg_ceiling(pg, backlog)
            with Phase("cdc-relay drains the backlog"):
                results[f"relay_drain_{key}"] = await relay_drain(pg, mq, backlog)
            for batch in (100, 1000):
                with Phase(f"polling peer (batch {batch}) drains the backlog"):
                    results[f"polling_{key}_b{batch}"] = await polling_drain(
                        pg.dsn, mq.amqp_url, backlog, batch
                    )
            backlog.drop(pg.dsn)

        for rate in rates:
            with Phase(f"cdc-relay live latency at {rate} rows/s for {seconds:.0f}s"):
                results[f"latency_{rate}"] = await live_latency(pg, mq, rate, seconds)
        with Phase(f"polling peer latency at 500 rows/s, 100 ms poll, {seconds:.0f}s"):
            results["polling_latency_500"] = await polling_latency(
                pg.dsn, mq.amqp_url, 500, seconds, 0.1
            )
        with Phase(f"cdc-relay peak RSS for one {big}-row transaction"):
            results["peak_rss"] = await relay_peak_rss(pg, mq, big)
    finally:
        mq.cleanup()
        pg.cleanup()
    return results


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def table(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["servers"]
    polls = [r[f"polling_txn1_b{b}"]["rows_per_s"] for b in (100, 1000)]
    best_poll = max(polls)
    drain1 = r["relay_drain_txn1"]["rows_per_s"]
    drain100 = r["relay_drain_txn100"]["rows_per_s"]
    classic = r["broker_classic"]["msgs_per_s"]
    pg1 = r["pg_ceiling_txn1"]["rows_per_s"]
    pg100 = r["pg_ceiling_txn100"]["rows_per_s"]
    cpu1 = r["relay_drain_txn1"]["cpu_us_per_msg"]
    cpu100 = r["relay_drain_txn100"]["cpu_us_per_msg"]
    lat2k = r["latency_2000"]
    rss = r["peak_rss"]
    lat_ok = lat2k["p50_ms"] < 5 and lat2k["p99_ms"] < 25
    rss_ok = rss["peak_rss_mb"] < 150
    rows = [
        ("Postgres ceiling: pg_recvlogical, 1-row txns", f"{pg1:,.0f} rows/s", ""),
        ("Postgres ceiling: pg_recvlogical, 100-row txns", f"{pg100:,.0f} rows/s", ""),
        ("Broker ceiling: classic durable queue", f"{classic:,.0f} msg/s", ""),
        ("Broker ceiling: quorum queue", f"{r['broker_quorum']['msgs_per_s']:,.0f} msg/s", ""),
        ("Polling peer drain, batch 100 (1-row txns)", f"{polls[0]:,.0f} rows/s", ""),
        ("Polling peer drain, batch 1000 (1-row txns)", f"{polls[1]:,.0f} rows/s", ""),
        ("Polling peer latency @500/s, 100 ms poll", _lat(r["polling_latency_500"]), ""),
        ("cdc-relay drain, 1-row txns", f"{drain1:,.0f} rows/s", ""),
        ("cdc-relay drain, 100-row txns", f"{drain100:,.0f} rows/s", ""),
        ("cdc-relay CPU per message (1-row / 100-row txns)", f"{cpu1:.0f} / {cpu100:.0f} us", ""),
        ("cdc-relay latency @500/s", _lat(r["latency_500"]), ""),
        ("cdc-relay latency @2000/s", _lat(lat2k), _target(lat_ok, "p50<5, p99<25 ms")),
        ("cdc-relay latency @5000/s", _lat(r["latency_5000"]), ""),
        (
            f"cdc-relay peak RSS, one {rss['rows']:,}-row txn",
            f"{rss['peak_rss_mb']:.0f} MB",
            _target(rss_ok, "<150 MB"),
        ),
        (
            "ratio: cdc-relay drain / polling peer (best)",
            f"{ratio(drain1, best_poll):.2f}x",
            _target(ratio(drain1, best_poll) >= 2, ">= 2x"),
        ),
        (
            "ratio: cdc-relay drain / broker ceiling (classic)",
            f"{ratio(drain1, classic):.0%}",
            _target(ratio(drain1, classic) >= 0.6, ">= 60%"),
        ),
        ("ratio: cdc-relay drain / Postgres ceiling", f"{ratio(drain1, pg1):.0%}", ""),
    ]
    head = (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}; "
        f"PostgreSQL {s['postgres']} ({s['postgres_settings']}), RabbitMQ {s['rabbitmq']}; "
        f"all on one machine{' (QUICK run)' if r['quick'] else ''}"
    )
    lines = [head, "", "| measurement | result | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    lines.append(
        "latency = commit returned in the writer -> delivered to a consumer "
        "(p50 / p95 / p99; an upper bound of commit -> broker confirm)"
    )
    return "\n".join(lines)


def _lat(d: dict[str, Any]) -> str:
    rate = f", {d['achieved_rate']:,.0f}/s achieved" if "achieved_rate" in d else ""
    return f"{d['p50_ms']:.1f} / {d['p95_ms']:.1f} / {d['p99_ms']:.1f} ms (n={d['n']}{rate})"


def _target(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'MISS'} ({text})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a one-to-two-minute version")
    args = parser.parse_args()
    started = time.monotonic()
    results = asyncio.run(run(args.quick))
    results["seconds"] = round(time.monotonic() - started, 1)
    out_dir = Path("bench-results")
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = table(results)
    results["table"] = text
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(text)
    print(f"\n(written to {path}; {results['seconds']:.0f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()

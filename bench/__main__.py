"""`make bench`: ceilings, a polling peer and cdc-relay, measured in one run.

Starts its own throwaway Postgres and RabbitMQ (loopback only, removed at the
end), runs every step with bounded counts and times, prints one markdown table
on stdout and writes everything to bench-results/bench-<timestamp>.json.
Progress goes to stderr. ``--quick`` is a one-to-two-minute version.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import env, multiout, pgside, plots, polling, relayrun, report, tls
from bench.broker import broker_ceiling, ceiling_shape, raw_publisher_latency
from bench.env import CpuMeter, Phase, log
from cdc_relay.config import DEFAULT_MAX_IN_FLIGHT
from devtools.servers import PostgresServer, RabbitServer

FULL = {
    "backlog": 100_000,
    "big": 1_000_000,
    "seconds": 15.0,
    "rates": [500, 2000, 5000, 10000],
    "window": 2000,
    "multi_outboxes": [2, 4],
    "multi_rows": 25_000,  # per outbox table
}
QUICK = {
    **FULL,
    "backlog": 20_000,
    "big": 100_000,
    "seconds": 5.0,
    "rates": [5000, 10000],
    "multi_rows": 5_000,
}
RELAY_MAX_IN_FLIGHT = DEFAULT_MAX_IN_FLIGHT  # cdc-relay's default --max-in-flight
POLL_INTERVAL = 0.1
QUIET_CORES = 0.3  # before each step, wait for other tenants to use less than this...
QUIET_WAIT = 30  # ...for at most this many seconds (full run)
QUIET_WAIT_QUICK = 3
POLL_BATCH_FOR_LATENCY = 1000
PLOT_DIR = Path(__file__).resolve().parent.parent / "docs" / "performance"


class Bench:
    """Runs the steps in order; a failed step is recorded and the others still run."""

    def __init__(self, quick: bool, workdir: Path) -> None:
        self.quick = quick
        self.sizes: dict[str, Any] = dict(QUICK if quick else FULL)
        self.workdir = workdir
        self.results: dict[str, Any] = {
            "quick": quick,
            "started": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": env.machine(),
            "code": env.git_revision(),
            "sizes": self.sizes,
            "relay_max_in_flight": RELAY_MAX_IN_FLIGHT,
        }
        self.pg = PostgresServer()
        self.mq = RabbitServer()
        self.roots: dict[str, int | None] = {}
        Phase.meter = CpuMeter(self._roots)

    def _roots(self) -> dict[str, int | None]:
        return {
            "bench": os.getpid(),
            "postgres": self.pg.postmaster_pid,
            "relay": relayrun.running_relay_pid(),
            **self.roots,  # rabbitmq, and the TLS-only pair while the tls step runs
        }

    async def settle(self) -> dict[str, float]:
        """Wait (bounded) until processes outside the bench use < QUIET_CORES for a second.

        On a shared machine this keeps one tenant's test run from landing in
        the middle of one step and not the other. Each step records what it saw.
        """
        limit = QUIET_WAIT_QUICK if self.quick else QUIET_WAIT
        meter = Phase.meter
        assert meter is not None
        started = time.monotonic()
        logged = False
        while True:
            before = meter.snapshot()
            await asyncio.sleep(1.0)
            other = CpuMeter.cores(before, meter.snapshot())["other"]
            waited = time.monotonic() - started
            if other < QUIET_CORES or waited >= limit:
                if logged:
                    log(f"  waited {waited:.0f}s; other load now {other:.2f} cores")
                return {"waited_s": round(waited, 1), "other_cores": other}
            if not logged:
                log(f"  waiting for other load ({other:.2f} cores) to drop (at most {limit}s)")
                logged = True

    async def step(
        self, key: str, title: str, body: Callable[[Phase], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        quiet = await self.settle()
        with Phase(title) as phase:
            try:
                result = await body(phase)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["cpu"] = phase.measure_cpu() if not phase.cpu else phase.cpu
            result["settle"] = quiet
            phase.summary = _summary(result)
        self.results[key] = result
        return result

    async def run(self) -> dict[str, Any]:
        z = self.sizes
        pg, mq = self.pg, self.mq
        try:
            with Phase("starting throwaway Postgres and RabbitMQ", measure=False):
                await asyncio.gather(asyncio.to_thread(pg.start), asyncio.to_thread(mq.start))
                self.roots["rabbitmq"] = mq.beam_pid
            self.results["servers"] = {
                "postgres": pgside.server_version(pg.dsn),
                "postgres_settings": ", ".join(
                    f"{k}={pg.settings[k]}"
                    for k in ("fsync", "full_page_writes", "synchronous_commit", "shared_buffers")
                ),
                "rabbitmq": mq.ctl("version").strip().splitlines()[-1],
                "erlang": env.erlang_otp(),
            }

            for txn in (1, 100):
                await self._backlog_steps(txn)
            await self._quorum_drain()

            for rate in z["rates"]:
                await self.step(
                    f"latency_{rate}",
                    f"cdc-relay live latency at {rate:,} rows/s for {z['seconds']:.0f}s",
                    functools.partial(
                        relayrun.relay_latency,
                        pgside.new_settings(pg.dsn, mq.amqp_url, f"lat{rate}"),
                        rate,
                        z["seconds"],
                        self.workdir,
                    ),
                )
                await self.step(
                    f"raw_latency_{rate}",
                    f"raw publisher publish->confirm at {rate:,} msg/s for {z['seconds']:.0f}s",
                    functools.partial(
                        raw_publisher_latency, mq.amqp_url, rate, z["seconds"], self.workdir
                    ),
                )
            await self.step(
                "polling_latency_500",
                f"polling peer latency at 500 rows/s, 100 ms poll, for {z['seconds']:.0f}s",
                lambda p: polling.polling_latency(
                    pg.dsn,
                    mq.amqp_url,
                    500,
                    z["seconds"],
                    POLL_INTERVAL,
                    POLL_BATCH_FOR_LATENCY,
                    self.workdir,
                    p,
                ),
            )
            await self.step(
                "peak_rss",
                f"cdc-relay peak RSS relaying one {z['big']:,}-row transaction",
                self._peak_rss,
            )
            await self._multi_outbox()
            t = tls.QUICK if self.quick else tls.FULL
            await self.step(
                "tls",
                f"cdc-relay over TLS ({tls.BOTH}) and plain: {t['rows']:,}-row drain,"
                f" {t['rate']:,} rows/s and bursts",
                self._tls,
            )
        finally:
            with Phase("stopping the servers", measure=False):
                mq.cleanup()
                pg.cleanup()
        return self.results

    async def _backlog_steps(self, txn: int) -> None:
        z, pg, mq = self.sizes, self.pg, self.mq
        n = z["backlog"]
        settings = pgside.new_settings(pg.dsn, mq.amqp_url, f"txn{txn}")
        holder: dict[str, pgside.Backlog] = {}

        async def fill(_p: Phase) -> dict[str, Any]:
            backlog = await asyncio.to_thread(pgside.make_backlog, settings, n, txn)
            holder["backlog"] = backlog
            return {
                "rows": n,
                "txn_size": txn,
                "seconds": backlog.fill_seconds,
                "rows_per_s": n / backlog.fill_seconds,
            }

        await self.step(
            f"fill_txn{txn}", f"backlog: {n:,} rows in {txn}-row transactions (relay stopped)", fill
        )
        backlog = holder.get("backlog")
        if backlog is None:
            return
        try:
            await self.step(
                f"pg_ceiling_txn{txn}",
                "Postgres ceiling: pg_recvlogical decodes the backlog",
                lambda _p: asyncio.to_thread(pgside.pg_ceiling, pg, backlog),
            )
            if txn == 1:
                # The ceiling the drain is compared with is measured right before and
                # right after it, at the reference window and at the relay's: the best
                # of the four (on a shared machine the load moves).
                await self._broker("broker_classic_before", "classic", z["window"])
                await self._broker(
                    "broker_classic_relay_window_before", "classic", RELAY_MAX_IN_FLIGHT
                )
            sample: dict[str, Any] = {}
            await self.step(
                f"relay_drain_txn{txn}",
                "cdc-relay drains the backlog",
                lambda p: relayrun.relay_drain(
                    backlog, self.workdir, p, _drain_timeout(n), sample=sample if txn == 1 else None
                ),
            )
            if txn == 1:
                # Like for like: the ceiling's message against one the relay just published.
                self.results["relay_message"] = sample
                self.results["ceiling_message"] = ceiling_shape()
                await self._broker("broker_classic_after", "classic", z["window"])
                await self._broker("broker_classic_relay_window", "classic", RELAY_MAX_IN_FLIGHT)
                self.results["broker_classic"] = best_of(
                    self.results["broker_classic_before"],
                    self.results["broker_classic_relay_window_before"],
                    self.results["broker_classic_after"],
                    self.results["broker_classic_relay_window"],
                )
                await self._dead_letter_drain()
                # No slot may hold back WAL (or decode) while the peer runs.
                await asyncio.to_thread(
                    pgside.drop_slots, pg.dsn, settings.slot, backlog.ceiling_slot
                )
                for batch in (100, 1000):
                    await self.step(
                        f"polling_b{batch}",
                        f"polling peer (batch {batch}) drains a copy of the backlog",
                        functools.partial(
                            polling.polling_drain,
                            pg.dsn,
                            mq.amqp_url,
                            settings.table,
                            batch,
                            timeout=900,
                        ),
                    )
        finally:
            await asyncio.to_thread(backlog.drop)

    async def _quorum_drain(self) -> None:
        """The same 1-row-transaction drain into a quorum queue (a faster broker path).

        Its ceiling is measured right before (reference window) and right after
        (the relay's window) the drain, and the better of the two is used.
        """
        n = self.sizes["backlog"]
        settings = pgside.new_settings(self.pg.dsn, self.mq.amqp_url, "quorum")
        log(f"backlog for the quorum-queue drain: {n:,} rows in 1-row transactions ...")
        backlog = await asyncio.to_thread(pgside.make_backlog, settings, n, 1)
        try:
            await asyncio.to_thread(pgside.drop_slots, self.pg.dsn, backlog.ceiling_slot)
            await self._broker("broker_quorum_before", "quorum", self.sizes["window"])
            await self.step(
                "relay_drain_quorum",
                "cdc-relay drains a 1-row-transaction backlog into a quorum queue",
                lambda p: relayrun.relay_drain(
                    backlog, self.workdir, p, _drain_timeout(n), {"x-queue-type": "quorum"}
                ),
            )
            await self._broker("broker_quorum_after", "quorum", RELAY_MAX_IN_FLIGHT)
            self.results["broker_quorum"] = best_of(
                self.results["broker_quorum_before"], self.results["broker_quorum_after"]
            )
        finally:
            await asyncio.to_thread(backlog.drop)

    async def _dead_letter_drain(self) -> None:
        """The 1-row drain again with no queue bound: every row returned and dead-lettered."""
        n = self.sizes["backlog"]
        settings = pgside.new_settings(self.pg.dsn, self.mq.amqp_url, "dead")
        log(f"backlog for the dead-letter drain: {n:,} rows in 1-row transactions ...")
        backlog = await asyncio.to_thread(pgside.make_backlog, settings, n, 1)
        try:
            await asyncio.to_thread(pgside.drop_slots, self.pg.dsn, backlog.ceiling_slot)
            await self.step(
                "relay_drain_dead_letter",
                "cdc-relay drains a backlog with no queue bound (every row dead-lettered)",
                lambda p: relayrun.relay_dead_letter_drain(
                    backlog, self.workdir, p, _drain_timeout(n)
                ),
            )
        finally:
            await asyncio.to_thread(backlog.drop)

    async def _multi_outbox(self) -> None:
        """Several outboxes on one slot (``run --config``) vs one slot and relay per outbox."""
        if not await asyncio.to_thread(multiout.config_supported):
            log("several outboxes on one slot: skipped, this relay's `run` has no --config")
            self.results["multi_outbox"] = {"skipped": "`cdc-relay run` has no --config"}
            return
        z = self.sizes
        await self.step(
            "multi_outbox",
            f"{' and '.join(map(str, z['multi_outboxes']))} outboxes of {z['multi_rows']:,} rows:"
            " one slot and relay (--config) vs a slot and relay each",
            lambda p: multiout.compare(
                self.pg.dsn,
                self.mq.amqp_url,
                z["multi_outboxes"],
                z["multi_rows"],
                self.workdir,
                p,
            ),
        )

    async def _broker(self, key: str, kind: str, window: int) -> None:
        n = self.sizes["backlog"]
        await self.step(
            key,
            f"broker ceiling: {n:,} persistent messages, {kind} queue, window {window:,}",
            lambda _p: broker_ceiling(self.mq.amqp_url, kind, n, window),
        )

    async def _peak_rss(self, phase: Phase) -> dict[str, Any]:
        z, pg, mq = self.sizes, self.pg, self.mq
        settings = pgside.new_settings(pg.dsn, mq.amqp_url, "big")
        pgside.init_outbox(settings)
        try:
            return await relayrun.relay_peak_rss(
                settings, z["big"], self.workdir, phase, _drain_timeout(z["big"])
            )
        finally:
            await asyncio.to_thread(pgside.drop_outbox, settings)

    async def _tls(self, phase: Phase) -> dict[str, Any]:
        """verify-full / amqps next to plain / plain, same functions and sizes as bench.tls.

        The plain side is this bench's own servers; only a TLS-only pair is started,
        and its processes are named in the CPU split so they do not count as "other".
        """
        sizes = dict(tls.QUICK if self.quick else tls.FULL)
        async with tls.tls_only_servers(self.workdir) as (pg_tls, mq_tls):
            self.roots.update(postgres_tls=pg_tls.postmaster_pid, rabbitmq_tls=mq_tls.beam_pid)
            try:
                phase.restart_cpu()
                chosen = tls.targets(self.pg, self.mq, pg_tls, mq_tls)
                measured = await tls.compare(
                    [chosen[tls.PLAIN], chosen[tls.BOTH]], sizes, self.workdir
                )
            finally:
                phase.measure_cpu()  # while the TLS pair still runs
                self.roots.pop("postgres_tls", None)
                self.roots.pop("rabbitmq_tls", None)
        result: dict[str, Any] = {
            "label": tls.BOTH,
            "sizes": sizes,
            "plain": measured[tls.PLAIN],
            "tls": measured[tls.BOTH],
        }
        failed = [f"{label}: {r['error']}" for label, r in measured.items() if "error" in r]
        if failed:
            result["error"] = "; ".join(failed)
        return result


def best_of(*candidates: dict[str, Any]) -> dict[str, Any]:
    """The fastest ceiling run (an error only if all failed), noting every rate and window."""
    runs = [r for r in candidates if "error" not in r]
    if not runs:
        return candidates[0]
    best = dict(max(runs, key=lambda r: r["msgs_per_s"]))
    best["runs_msgs_per_s"] = [r.get("msgs_per_s") for r in candidates]
    best["runs_windows"] = [r.get("window") for r in candidates]
    return best


def _drain_timeout(rows: int) -> float:
    """Generous but bounded: 300 rows/s would already be a failure."""
    return min(max(120.0, rows / 300), 3600.0)


def _summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"FAILED {result['error'][:200]}"
    if "tls" in result and "plain" in result:
        d, p = result["tls"]["drain"], result["plain"]["drain"]
        return f"TLS {d['rows_per_s']:,.0f} rows/s, plain {p['rows_per_s']:,.0f} rows/s"
    for key, unit in (("msgs_per_s", "msg/s"), ("rows_per_s", "rows/s")):
        if key in result and "p50_ms" not in result:
            extra = (
                f", {result['cpu_us_per_msg']:.0f} µs CPU/msg" if "cpu_us_per_msg" in result else ""
            )
            return f"{result[key]:,.0f} {unit}{extra}"
    if "p50_ms" in result:
        return (
            f"p50 {result['p50_ms']:.1f} p95 {result['p95_ms']:.1f} p99 {result['p99_ms']:.1f} ms,"
            f" {result['achieved_rate']:,.0f}/s achieved, n={result['n']:,}"
        )
    return ""


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the one-to-two-minute version")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("bench-results"), help="where the JSON goes"
    )
    parser.add_argument(
        "--plot-dir",
        type=Path,
        default=PLOT_DIR,
        help="where the PNG plots go (default: docs/performance/, next to the doc)",
    )
    args = parser.parse_args()
    # Stop cleanly (servers removed, partial results written) on SIGTERM, and on SIGINT
    # even when started in the background, where the shell makes SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cdc-relay-bench-"))
    bench = Bench(args.quick, workdir)
    code = 0
    try:
        results = asyncio.run(bench.run())
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'SIGINT'}); writing what was measured")
        results = bench.results
        results["interrupted"] = True
        code = 130
    finally:
        for path in workdir.iterdir():
            if path.stat().st_size == 0:
                path.unlink()
        kept = [p.name for p in workdir.iterdir()]
        if kept:
            log(f"relay logs with warnings kept in {workdir}: {', '.join(kept)}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["ratios"] = report.ratios(results)
    results["verdicts"] = report.verdicts(results)
    text = report.table(results)
    results["table"] = text
    results["plots"] = plots.write_plots(results, args.plot_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(text)
    log(f"results written to {path}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    if failed:
        log(f"failed steps: {', '.join(failed)}")
        code = code or 1
    sys.exit(code)


if __name__ == "__main__":
    main()

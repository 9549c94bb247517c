"""cdc-relay as a real subprocess: backlog drain, live latency and peak memory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import psycopg

from bench.env import Phase, cdf_points, percentiles, proc_cpu_seconds, proc_status_kb
from bench.loadproc import read_times
from bench.pgside import (
    LSN_SLACK,
    Backlog,
    SlotWatch,
    dead_letter_count,
    drop_outbox,
    fill,
    init_outbox,
)
from cdc_relay.config import Settings
from cdc_relay.lsn import format_lsn
from devtools import amqp
from devtools.relayproc import RelayProcess
from devtools.servers import free_port

_running: RelayProcess | None = None
DEAD_LETTERED = "dead-lettered outbox row"  # the relay's WARNING line per dead letter


def start_relay(settings: Settings, workdir: Path) -> RelayProcess:
    """The relay with default tuning, WARNING logs, a metrics port and BENCH_RELAY_ARGS."""
    global _running
    relay = RelayProcess(
        settings,
        workdir / f"relay-{settings.slot}.log",
        *os.environ.get("BENCH_RELAY_ARGS", "").split(),
        log_level="WARNING",
        stats_interval=None,
        metrics_port=free_port(),
    )
    _running = relay.start()
    return relay


def running_relay_pid() -> int | None:
    """The pid of the relay a step is measuring, for the CPU accounting."""
    if _running is None or _running.proc is None or _running.proc.poll() is not None:
        return None
    return _running.pid


async def topology(amqp_url: str, exchange: str, queue: str, **arguments: Any) -> None:
    """The exchange (as the relay declares it) and a durable queue bound with '#'."""
    await amqp.topology(amqp_url, exchange, queue, arguments=arguments or None)


async def remove_topology(amqp_url: str, exchange: str, queue: str | None) -> None:
    await amqp.delete_topology(amqp_url, queue, exchange)


async def relay_drain(
    backlog: Backlog,
    workdir: Path,
    phase: Phase,
    timeout: float,
    queue_arguments: dict[str, Any] | None = None,
    sample: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start the relay on a backlog; time until the slot is confirmed past the last commit.

    The clock starts when /readyz answers 200 (the relay streams); startup is
    reported separately. CPU per message is the relay's utime+stime over the
    same interval, divided by the rows; the walsender's likewise. With
    ``sample``, one message the relay published is described into it (for the
    like-for-like check of the broker ceiling).
    """
    settings = backlog.settings
    queue = f"q_{settings.exchange}"
    await topology(settings.amqp_urls[0], settings.exchange, queue, **(queue_arguments or {}))
    result = await _run_until_flushed(
        settings, queue, backlog.rows, backlog.end_lsn, workdir, phase, timeout
    )
    if sample is not None:
        sample.update(await describe_one_message(settings.amqp_urls[0], queue))
    await remove_topology(settings.amqp_urls[0], settings.exchange, queue)
    return result


async def relay_dead_letter_drain(
    backlog: Backlog, workdir: Path, phase: Phase, timeout: float
) -> dict[str, Any]:
    """The drain with no queue bound: every message returned and dead-lettered by the relay.

    The exchange exists (declared as the relay declares it) but nothing is bound
    to it, so each mandatory publish comes back as basic.return and the relay
    writes the row to its dead-letter table before the slot may pass it. The
    table must then hold every row.
    """
    settings = backlog.settings
    await amqp.declare_exchange(settings.amqp_urls[0], settings.exchange)
    result = await _run_until_flushed(
        settings,
        None,
        backlog.rows,
        backlog.end_lsn,
        workdir,
        phase,
        timeout,
        expected_warning=DEAD_LETTERED,
    )
    await remove_topology(settings.amqp_urls[0], settings.exchange, None)
    dead = await asyncio.to_thread(dead_letter_count, settings)
    if dead < backlog.rows:
        raise RuntimeError(f"slot confirmed but only {dead} of {backlog.rows} rows dead-lettered")
    result["dead_letters"] = dead
    return result


async def describe_one_message(amqp_url: str, queue: str) -> dict[str, Any]:
    """Exchange, routing key, body size and properties of one queued message (basic.get)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        message = await declared.get(no_ack=False, fail=False)
        if message is None:
            return {}
        await message.nack(requeue=True)
        return message_shape(
            message.exchange or "",
            message.routing_key or "",
            len(message.body),
            {
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
                "headers": dict(message.headers or {}),
                "delivery_mode": int(message.delivery_mode) if message.delivery_mode else None,
                "priority": message.priority or None,
                "correlation_id": message.correlation_id,
                "reply_to": message.reply_to,
                "expiration": message.expiration,
                "message_id": message.message_id,
                "timestamp": message.timestamp,
                "type": message.type,
                "user_id": message.user_id,
                "app_id": message.app_id,
            },
        )


def message_shape(
    exchange: str, routing_key: str, body_bytes: int, properties: dict[str, Any]
) -> dict[str, Any]:
    """What makes two messages cost the broker the same: which properties are set (with the
    constant ones' values), the header names and value types, the body size, the route."""
    per_message = {"message_id", "timestamp"}  # set on every message, values differ
    shape: dict[str, Any] = {
        "exchange_is_relays": not exchange.startswith("bench_ceiling"),
        "routing_key": routing_key,
        "body_bytes": body_bytes,
    }
    for name, value in sorted(properties.items()):
        if value is None or value == {}:
            continue
        if name == "headers":
            shape["headers"] = {k: type(v).__name__ for k, v in sorted(value.items())}
        elif name in per_message:
            shape[name] = "set"
        else:
            shape[name] = value
    return shape


def shape_differences(relay: dict[str, Any], ceiling: dict[str, Any]) -> list[str]:
    """How the ceiling's message differs from the relay's (the exchange's name aside)."""
    keys = sorted((set(relay) | set(ceiling)) - {"exchange_is_relays"})
    return [
        f"{k}: relay {relay.get(k)!r}, ceiling {ceiling.get(k)!r}"
        for k in keys
        if relay.get(k) != ceiling.get(k)
    ]


async def _run_until_flushed(
    settings: Settings,
    queue: str | None,
    rows: int,
    end_lsn: int,
    workdir: Path,
    phase: Phase,
    timeout: float,
    sample_rss: bool = False,
    expect_in_queue: int | None = None,
    expected_warning: str | None = None,
) -> dict[str, Any]:
    """Run the relay until its slot passes ``end_lsn``; time, CPU (relay and walsender), RSS.

    Without a ``queue`` nothing is counted on the broker (the dead-letter drain).
    A log holding only ``expected_warning`` lines is removed like an empty one.
    """
    relay = start_relay(settings, workdir)
    watch = SlotWatch(settings.dsn, settings.slot)
    peak_rss_sampled = 0
    in_queue = 0
    try:
        startup = await relay.wait_ready()
        walsender = await _walsender_pid(watch, relay)
        cpu_before = proc_cpu_seconds(relay.pid)
        wal_cpu_before = proc_cpu_seconds(walsender)
        deadline = relay.ready_at + timeout
        last_count = time.monotonic()
        while True:
            confirmed = watch.confirmed()
            if confirmed >= end_lsn - LSN_SLACK:
                break
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(
                    f"relay did not drain in {timeout:.0f}s (slot at {format_lsn(confirmed)},"
                    f" target {format_lsn(end_lsn)}): {relay.log_tail()}"
                )
            relay.check_alive()
            if sample_rss:
                peak_rss_sampled = max(peak_rss_sampled, proc_status_kb(relay.pid, "VmRSS"))
            if now - last_count > 3 and queue is not None:
                last_count = now
                in_queue = await amqp.queue_depth(settings.amqp_urls[0], queue)
                phase.note(f"{in_queue:,} messages in the queue", 0)
            await asyncio.sleep(0.01)
        seconds = time.monotonic() - relay.ready_at
        cpu = proc_cpu_seconds(relay.pid) - cpu_before
        wal_cpu = proc_cpu_seconds(walsender) - wal_cpu_before
        peak_kb = proc_status_kb(relay.pid, "VmHWM")
        phase.measure_cpu()
        if queue is not None:
            in_queue = await amqp.queue_depth(settings.amqp_urls[0], queue)
    finally:
        watch.close()
        code = relay.stop()
    if code != 0:
        raise RuntimeError(f"relay exited with {code}: {relay.log_tail()}")
    if expected_warning is not None and all(
        expected_warning in line for line in relay.log().splitlines()
    ):
        relay.log_path.unlink(missing_ok=True)
    relay.cleanup_log()
    expected = rows if expect_in_queue is None else expect_in_queue
    if queue is not None and in_queue < expected:
        raise RuntimeError(f"slot confirmed but only {in_queue} of {expected} messages queued")
    result: dict[str, Any] = {
        "rows": rows,
        "seconds": seconds,
        "startup_seconds": startup,
        "rows_per_s": rows / seconds,
        "cpu_us_per_msg": cpu / rows * 1e6,
        "relay_cores": cpu / seconds,
        "walsender_cpu_us_per_row": wal_cpu / rows * 1e6,
        "walsender_cores": wal_cpu / seconds,
        "relay_vs_walsender": cpu / wal_cpu if wal_cpu > 0 else float("inf"),
        "peak_rss_mb": peak_kb / 1024,
    }
    if queue is not None:
        result["in_queue"] = in_queue
    if sample_rss:
        result["peak_rss_sampled_mb"] = peak_rss_sampled / 1024
    return result


async def _walsender_pid(watch: SlotWatch, relay: RelayProcess, timeout: float = 10) -> int:
    """The walsender streaming the relay's slot (``pg_replication_slots.active_pid``).

    /readyz says the relay streams, so the slot is normally held already; a few
    polls cover a relay that reports ready a moment before START_REPLICATION lands.
    """
    deadline = time.monotonic() + timeout
    while True:
        pid = watch.active_pid()
        if pid is not None:
            return pid
        relay.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no walsender holds slot {watch.slot} {timeout:.0f}s after /readyz")
        await asyncio.sleep(0.01)


async def relay_peak_rss(
    settings: Settings, rows: int, workdir: Path, phase: Phase, timeout: float
) -> dict[str, Any]:
    """VmHWM of a relay that relays one ``rows``-row transaction (queue capped, see below).

    The queue keeps only the newest 100,000 messages (``x-max-length``, drop-head:
    still confirmed) so that a million persistent messages do not fill the
    broker's disk; the relay's work per message is unchanged.
    """
    queue = f"q_{settings.exchange}"
    await topology(settings.amqp_urls[0], settings.exchange, queue, **{"x-max-length": 100_000})
    end_lsn, fill_seconds = fill(settings.dsn, settings.table, rows, rows)
    phase.note(f"{rows:,}-row transaction committed in {fill_seconds:.1f}s", 0)
    result = await _run_until_flushed(
        settings,
        queue,
        rows,
        end_lsn,
        workdir,
        phase,
        timeout,
        sample_rss=True,
        expect_in_queue=min(rows, 100_000),
    )
    result["fill_seconds"] = fill_seconds
    await remove_topology(settings.amqp_urls[0], settings.exchange, queue)
    return result


# -- live latency -------------------------------------------------------------------------


class Consumer:
    """``bench.loadproc consumer`` as a child process, driven over its stdin/stdout."""

    def __init__(self, amqp_url: str, queue: str, out: Path, max_seconds: float) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.loadproc",
                "consumer",
                "--url",
                amqp_url,
                "--queue",
                queue,
                "--max-seconds",
                str(max_seconds),
                "--out",
                str(out),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def _line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"consumer exited ({self.proc.poll()})")
        return line.strip()

    async def ready(self) -> None:
        if await self._line() != "ready":
            raise RuntimeError("consumer did not start")

    async def count(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(await self._line())

    async def wait_for(self, n: int, timeout: float, phase: Phase | None = None) -> int:
        deadline = time.monotonic() + timeout
        while True:
            got = await self.count()
            if got >= n or time.monotonic() > deadline:
                return got
            if phase is not None:
                phase.note(f"{got:,} of {n:,} delivered")
            await asyncio.sleep(0.1)

    async def stop(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            await self._line(60)
            await asyncio.to_thread(self.proc.wait, 30)
        return read_times(self.out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def writer_connections(rate: int) -> int:
    """Enough connections that a few ms per round trip (a busy 2-core host) still keeps pace."""
    return max(2, -(-rate // 200))


async def run_writer(
    dsn: str, table: str, rate: int, seconds: float, out: Path, phase: Phase
) -> dict[str, Any]:
    """The paced writer process; returns its summary (rows written, lateness)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadproc",
        "writer",
        "--dsn",
        dsn,
        "--table",
        table,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--connections",
        str(writer_connections(rate)),
        "--out",
        str(out),
        stdout=asyncio.subprocess.PIPE,
    )
    return await read_summary(proc, phase, f"writing at {rate}/s", seconds + 60)


async def read_summary(
    proc: asyncio.subprocess.Process, phase: Phase, note: str, limit: float
) -> dict[str, Any]:
    """The JSON summary a load process prints last, waiting at most ``limit`` seconds.

    One communicate() for the whole wait: cancelling it on a timeout (as
    ``wait_for`` does) throws away output it had already read, and on a busy
    machine, where the process takes a while to exit after printing, the summary
    was lost.
    """
    started = time.monotonic()
    communicate = asyncio.ensure_future(proc.communicate())
    while True:
        done, _ = await asyncio.wait({communicate}, timeout=1.0)
        if done:
            stdout, _ = communicate.result()
            break
        phase.note(note, 5)
        if time.monotonic() - started > limit:
            proc.kill()
            # Reaped before raising, so that no subprocess transport outlives the loop.
            await asyncio.wait({communicate}, timeout=10)
            raise RuntimeError(f"load process did not finish in {limit:.0f}s")
    if proc.returncode != 0:
        raise RuntimeError(f"load process failed with {proc.returncode}")
    lines = stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError("load process exited without its summary line")
    return dict(json.loads(lines[-1]))


COMMIT_TO_CONFIRM = "cdc_relay_commit_to_confirm_seconds"


def histogram_result(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """Quantiles of the observations between two scrapes of a cumulative histogram.

    Linear interpolation inside a bucket (as Prometheus' histogram_quantile);
    the shares at or under 5 ms and 25 ms are exact, as both are bucket edges.
    """
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    result: dict[str, float] = {"n": total}
    if not total:
        return result
    for q in (50, 95, 99):
        rank = total * q / 100
        lower, below = 0.0, 0.0
        for bound, cumulative in zip(bounds, counts, strict=True):
            if cumulative >= rank:
                if bound == float("inf"):
                    value = lower  # beyond the last finite edge: report that edge
                else:
                    inside = cumulative - below
                    value = lower + (bound - lower) * ((rank - below) / inside if inside else 1)
                result[f"p{q}_ms"] = value * 1e3
                break
            lower, below = bound, cumulative
    for edge in (0.005, 0.025):
        if edge in after:
            result[f"share_le_{edge * 1e3:g}ms"] = (after[edge] - before.get(edge, 0.0)) / total
    return result


def histogram_cdf(before: dict[float, float], after: dict[float, float]) -> list[list[float]]:
    """[bucket edge in ms, share at or under it] between two scrapes (finite edges only)."""
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if not total:
        return []
    return [
        [bound * 1e3, (after[bound] - before.get(bound, 0.0)) / total]
        for bound in sorted(after)
        if bound != float("inf")
    ]


def latency_result(
    committed: dict[str, float], received: dict[str, float], writer: dict[str, float], rate: int
) -> dict[str, Any]:
    """Percentiles of receive - commit over the writer's rows, plus what was missing."""
    latencies = [received[k] - t for k, t in committed.items() if k in received]
    result: dict[str, Any] = dict(percentiles(latencies))
    result["cdf"] = cdf_points(latencies)
    result["target_rate"] = rate
    result["achieved_rate"] = writer["n"] / writer["seconds"]
    result["missing"] = len(committed) - len(latencies)
    result["writer_late_count"] = writer["late_count"]
    result["writer_late_p99_ms"] = writer["late_p99_ms"]
    return result


async def relay_latency(
    settings: Settings, rate: int, seconds: float, workdir: Path, phase: Phase
) -> dict[str, Any]:
    """Commit -> consumer receipt while the relay streams single-row transactions at ``rate``."""
    queue = f"q_{settings.exchange}"
    init_outbox(settings)
    await topology(settings.amqp_urls[0], settings.exchange, queue)
    relay = start_relay(settings, workdir)
    consumer = Consumer(
        settings.amqp_urls[0], queue, workdir / f"{settings.slot}.recv", seconds + 180
    )
    try:
        await relay.wait_ready()
        await consumer.ready()
        # Warm the whole path (and the relay's caches) before the clock runs.
        with psycopg.connect(settings.dsn, autocommit=True) as conn:
            for _ in range(20):
                conn.execute(
                    f"INSERT INTO {settings.table} (aggregate_type, aggregate_id, event_type,"
                    " payload) VALUES ('order', 'warmup', 'Warmup', '{}')"
                )
        if await consumer.wait_for(20, 30) < 20:
            raise RuntimeError(f"warm-up messages did not arrive: {relay.log_tail()}")
        cpu_before = proc_cpu_seconds(relay.pid)
        histogram_before = await relay.histogram(COMMIT_TO_CONFIRM)
        started = time.monotonic()
        out = workdir / f"{settings.slot}.sent"
        writer = await run_writer(settings.dsn, settings.table, rate, seconds, out, phase)
        await consumer.wait_for(20 + int(writer["n"]), 60, phase)
        relay_cores = (proc_cpu_seconds(relay.pid) - cpu_before) / (time.monotonic() - started)
        confirmed: dict[str, Any] = {}
        for _ in range(100):  # the last confirms may trail the deliveries a little
            histogram_after = await relay.histogram(COMMIT_TO_CONFIRM)
            confirmed = histogram_result(histogram_before, histogram_after)
            if confirmed["n"] >= writer["n"]:
                break
            await asyncio.sleep(0.05)
        confirmed["cdf"] = histogram_cdf(histogram_before, histogram_after)
        phase.measure_cpu()
        received = await consumer.stop()
        relay.check_alive()
    finally:
        consumer.kill()
        code = relay.stop()
    if code != 0:
        raise RuntimeError(f"relay exited with {code}: {relay.log_tail()}")
    relay.cleanup_log()
    result = latency_result(read_times(out), received, writer, rate)
    result["relay_cores"] = relay_cores
    result["commit_to_confirm"] = confirmed
    for path in (out, consumer.out):
        path.unlink(missing_ok=True)
    await remove_topology(settings.amqp_urls[0], settings.exchange, queue)
    await asyncio.to_thread(drop_outbox, settings)
    return result

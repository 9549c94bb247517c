"""Several outboxes on one slot (``run --config``) against one slot and one relay per outbox.

Each outbox table gets its own backlog of 1-row transactions and its own
exchange and queue. Shared: one publication over every table, one slot, one
relay started with a TOML config file naming the tables. Separate: one
publication, slot and relay per table, all started at once. Each relay is
timed from its own /readyz to its slot confirmed past its last commit, and its
CPU and its walsender's are read over that window; rows/s is all rows over
the first /readyz to the last slot done.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.env import Phase, proc_cpu_seconds
from bench.pgside import LSN_SLACK, SlotWatch, drop_outbox, fill, init_outbox, new_settings
from cdc_relay.config import Settings
from devtools import amqp
from devtools.relayproc import RelayProcess
from devtools.servers import free_port

CONFIG_OPTION = "--config"


def config_supported() -> bool:
    """Whether this relay's ``run`` takes ``--config`` (several outboxes on one slot)."""
    done = subprocess.run(
        [sys.executable, "-m", "cdc_relay.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return CONFIG_OPTION in done.stdout


def config_toml(slot: str, publication: str, outboxes: list[tuple[str, str]]) -> str:
    """The config file: top-level slot and publication, one [[outbox]] per (table, exchange)."""
    lines = [f"slot = {_toml_string(slot)}", f"publication = {_toml_string(publication)}"]
    for table, exchange in outboxes:
        lines += ["", "[[outbox]]", f"table = {_toml_string(table)}"]
        lines.append(f"exchange = {_toml_string(exchange)}")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_outboxes(
    dsn: str, amqp_url: str, count: int, rows: int, shared: bool
) -> tuple[list[Settings], dict[str, int]]:
    """The tables (and slots, made before any row), then ``rows`` 1-row txns in each.

    Returns the settings per table (shared ones name the same slot and
    publication) and, per slot, the WAL position after its last table's last commit.
    """
    first = new_settings(dsn, amqp_url, f"multi{count}{'s' if shared else 'x'}")
    tables: list[Settings] = []
    for i in range(count):
        own = new_settings(dsn, amqp_url, f"m{count}t{i}")
        if shared:
            own = Settings(
                dsn=dsn,
                amqp_urls=[amqp_url],
                slot=first.slot,
                publication=first.publication,
                table=own.table,
                exchange=own.exchange,
            )
        init_outbox(own)
        tables.append(own)
    ends: dict[str, int] = {}
    for own in tables:
        ends[own.slot], _ = fill(dsn, own.table, rows, 1)
    return tables, ends


def drop_outboxes(tables: list[Settings]) -> None:
    for own in tables:
        drop_outbox(own)
    with psycopg.connect(tables[0].dsn, autocommit=True) as conn:
        for own in tables:
            conn.execute(f"DROP PUBLICATION IF EXISTS {own.publication}")


class ConfigRelay(RelayProcess):
    """``cdc-relay run --config FILE`` (with the DSN and broker URL as options)."""

    def __init__(self, settings: Settings, config: Path, log_path: Path) -> None:
        super().__init__(
            settings, log_path, log_level="WARNING", stats_interval=None, metrics_port=free_port()
        )
        self.config = config

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "cdc_relay.cli", "--log-level", self.log_level]
        args += ["--log-format", self.log_format, "run", "--dsn", self.settings.dsn]
        for url in self.settings.amqp_urls:
            args += ["--amqp-url", url]
        args += [CONFIG_OPTION, str(self.config)]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        return args


async def measure(
    tables: list[Settings],
    ends: dict[str, int],
    rows_per_table: int,
    shared: bool,
    workdir: Path,
    phase: Phase,
    timeout: float,
) -> dict[str, Any]:
    """Start the relay(s), wait until every slot passed its end (``ends``); rate, CPU per row."""
    amqp_url = tables[0].amqp_urls[0]
    for own in tables:
        await amqp.topology(amqp_url, own.exchange, f"q_{own.exchange}")
    relays: list[RelayProcess] = []
    if shared:
        config = workdir / f"{tables[0].slot}.toml"
        config.write_text(
            config_toml(
                tables[0].slot, tables[0].publication, [(s.table, s.exchange) for s in tables]
            )
        )
        relays.append(ConfigRelay(tables[0], config, workdir / f"relay-{tables[0].slot}.log"))
    else:
        relays += [
            RelayProcess(
                own,
                workdir / f"relay-{own.slot}.log",
                log_level="WARNING",
                stats_interval=None,
                metrics_port=free_port(),
            )
            for own in tables
        ]
    slots = [tables[0].slot] if shared else [own.slot for own in tables]  # one per relay
    watches = [SlotWatch(tables[0].dsn, slot) for slot in slots]
    try:
        for relay in relays:
            relay.start()
        windows = await asyncio.gather(
            *(
                _drain_window(relay, watch, ends[watch.slot], phase, timeout)
                for relay, watch in zip(relays, watches, strict=True)
            )
        )
        phase.measure_cpu()
        queued = [await amqp.queue_depth(amqp_url, f"q_{own.exchange}") for own in tables]
    finally:
        for w in watches:
            w.close()
        codes = [relay.stop() for relay in relays]
    failed = [(r, c) for r, c in zip(relays, codes, strict=True) if c != 0]
    if failed:
        raise RuntimeError(f"relay exited with {failed[0][1]}: {failed[0][0].log_tail()}")
    for relay in relays:
        relay.cleanup_log()
    for own in tables:
        await amqp.delete_topology(amqp_url, f"q_{own.exchange}", own.exchange)
    if min(queued) < rows_per_table:
        raise RuntimeError(f"slots confirmed but the queues hold {queued} of {rows_per_table} each")
    rows = rows_per_table * len(tables)
    seconds = max(w.done for w in windows) - min(w.ready for w in windows)
    relay_cpu = sum(w.relay_cpu for w in windows)
    wal_cpu = sum(w.walsender_cpu for w in windows)
    return {
        "outboxes": len(tables),
        "slots": len(slots),
        "relays": len(relays),
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "cpu_us_per_msg": relay_cpu / rows * 1e6,
        "walsender_cpu_us_per_row": wal_cpu / rows * 1e6,
    }


@dataclass
class Window:
    """One relay's drain: from its /readyz to its slot past its end, and the CPU in between."""

    ready: float
    done: float
    relay_cpu: float
    walsender_cpu: float


async def _drain_window(
    relay: RelayProcess, watch: SlotWatch, end_lsn: int, phase: Phase, timeout: float
) -> Window:
    """Each relay is timed from its own /readyz, as the single drain is (``relayrun``), so
    rows a relay drains while another still starts are inside its window."""
    await relay.wait_ready()
    ready = time.monotonic()
    walsender = await _active_pid(watch)
    relay_before, wal_before = proc_cpu_seconds(relay.pid), proc_cpu_seconds(walsender)
    while watch.confirmed() < end_lsn - LSN_SLACK:
        if time.monotonic() > ready + timeout:
            raise RuntimeError(f"slot {watch.slot} not drained in {timeout:.0f}s")
        relay.check_alive()
        phase.note("draining")
        await asyncio.sleep(0.01)
    return Window(
        ready,
        time.monotonic(),
        proc_cpu_seconds(relay.pid) - relay_before,
        proc_cpu_seconds(walsender) - wal_before,
    )


async def _active_pid(watch: SlotWatch, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (pid := watch.active_pid()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no walsender holds slot {watch.slot}")
        await asyncio.sleep(0.01)
    return pid


async def compare(
    dsn: str, amqp_url: str, counts: list[int], rows: int, workdir: Path, phase: Phase
) -> dict[str, Any]:
    """For each count: shared (one slot, one relay) then separate (a slot and relay each)."""
    out: dict[str, Any] = {"rows_per_table": rows}
    for count in counts:
        for shared in (True, False):
            key = f"{count}_{'shared' if shared else 'separate'}"
            tables, ends = await asyncio.to_thread(
                make_outboxes, dsn, amqp_url, count, rows, shared
            )
            try:
                phase.note(f"{key}: {count} x {rows:,} rows", 0)
                out[key] = await measure(
                    tables, ends, rows, shared, workdir, phase, max(120.0, count * rows / 300)
                )
            finally:
                await asyncio.to_thread(drop_outboxes, tables)
    return out

"""The background loops that run beside a stream, each performing what a pure module decides.

Per session (started by ``session.Session``, ended with it): standby status
updates (``pg.schedule``), the state row with the relay's position and health
(``state``, ``health``), the publication drift check (``health.DriftWatch``)
and the stats line. Per process (started by ``relay.Relay``, never ending it):
the slot poll for /metrics (standing by too) and outbox retention for ``run
--retention``. Each takes what it needs as
arguments, so the session's own module is only its lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg

from cdc_relay.amqp import Publisher
from cdc_relay.config import Settings
from cdc_relay.core import SessionCore, SessionFailed
from cdc_relay.deadline import event_within, within
from cdc_relay.errors import ConfigError
from cdc_relay.health import (
    DRIFT_CHECK_INTERVAL,
    DRIFT_KEY,
    DriftWatch,
    FlushWatch,
    Problems,
    drift_key,
    since_when,
)
from cdc_relay.lsn import format_lsn
from cdc_relay.metrics import Metrics
from cdc_relay.pg import catalog, checks, report
from cdc_relay.pg.liveness import PROBE_TIMEOUT, walsender_alive
from cdc_relay.pg.replication import ReplicationStream
from cdc_relay.pg.report import SlotStatus
from cdc_relay.pg.retention import retention_pass
from cdc_relay.pg.schedule import Probe, Send, StatusSchedule
from cdc_relay.redact import Redactor, one_line
from cdc_relay.state import StateWriter

log = logging.getLogger("cdc_relay")

HEALTHY_SESSION_SECONDS: Final = 30.0  # a session this long resets the backoff
SESSION_KEY: Final = "session"  # the problem key of a session that ended, until one is healthy
STATE_CHECK_INTERVAL: Final = 1.0  # the state writer itself writes at most every few seconds
DRIFT_CHECK_TIMEOUT: Final = 5.0  # statement_timeout of the drift check's side connection


# -- per session ---------------------------------------------------------------------


async def send_status(
    stream: ReplicationStream, core: SessionCore, metrics: Metrics, reply: bool = False
) -> None:
    """One standby status update with the core's positions; the metrics follow what was sent."""
    write, flush = core.status_positions()
    await stream.send_status(write, flush, flush, reply)
    core.status_sent(flush)
    metrics.flush_lsn.set(flush)
    metrics.received_lsn.set(core.received_lsn)


async def status_loop(
    stream: ReplicationStream,
    core: SessionCore,
    settings: Settings,
    metrics: Metrics,
    wakeup: asyncio.Event,
) -> None:
    """Perform what the schedule decides; the decisions are in pg/schedule.py.

    ``wakeup`` is set by whoever moved the core's flush (the pump, an outcome).
    """
    s = settings
    schedule = StatusSchedule(s.status_interval, s.pg_timeout, time.monotonic())
    while True:
        wait = schedule.wait_time(time.monotonic(), due=core.status_due)
        if wait > 0:
            await event_within(wakeup, wait)
        wakeup.clear()
        now = time.monotonic()
        silent = now - stream.last_receive if stream.waiting_for_data else None
        decision = schedule.decide(now, due=core.status_due, silent=silent)
        if type(decision) is Probe:
            probe_timeout = min(PROBE_TIMEOUT, max(2.0, s.pg_timeout))
            if not await walsender_alive(s.dsn, stream.backend_pid, probe_timeout):
                raise SessionFailed(
                    f"no data from Postgres for {decision.silent:.1f}s (--pg-timeout), "
                    "and it does not answer a new connection or our walsender is gone"
                )
            log.info(
                "no data from Postgres for %.0fs, but our walsender runs "
                "(decoding a large transaction?): waiting",
                decision.silent,
            )
            schedule.reprieve(time.monotonic())
        elif type(decision) is Send:
            await send_status(stream, core, metrics, decision.reply_requested)
            schedule.sent(now)


async def state_loop(
    core: SessionCore,
    writer: StateWriter,
    publisher: Publisher | None,
    problems: Problems,
    settings: Settings,
    metrics: Metrics | None = None,
) -> None:
    """Record where the relay is and what is wrong (throttled in state.py).

    The position is for `resync` without --since; the health (problems, a
    blocked broker, a flush that waits) for `status` in another process. The
    gauges that would cost the hot path if set per message (in flight, blocked,
    last confirm) are set here, every second.
    """
    # The row is read by other processes and roles: no password of ours goes there.
    redact = Redactor([settings.dsn, *settings.amqp_urls])
    started = time.monotonic()
    watch = FlushWatch()
    blocked_since: datetime | None = None
    confirmed = metrics.confirmed.value if metrics is not None else 0
    while True:
        await asyncio.sleep(STATE_CHECK_INTERVAL)
        now = time.monotonic()
        if core.made_progress or now - started > HEALTHY_SESSION_SECONDS:
            problems.clear(SESSION_KEY)
        await writer.maybe_write(now, core.confirmed_commit_time, core.flush_lsn)
        wall = datetime.now(UTC)
        blocked = publisher is not None and publisher.blocked
        blocked_since = since_when(blocked, blocked_since, wall)
        if metrics is not None:
            confirmed = observe_publisher(metrics, publisher, blocked, confirmed, wall)
        waiting = watch.update(core.flush_lsn, core.unconfirmed, wall)
        problem, problem_since = problems.summary()
        if problem is not None:
            problem = redact(problem)
        await writer.maybe_report(now, (problem, problem_since, blocked_since, waiting))


def observe_publisher(
    metrics: Metrics, publisher: Publisher | None, blocked: bool, confirmed: int, wall: datetime
) -> int:
    """Set the publisher's gauges; returns the confirmed count, to tell the next call if it grew."""
    metrics.in_flight_messages.set(publisher.in_flight if publisher is not None else 0)
    metrics.in_flight_bytes.set(publisher.in_flight_bytes if publisher is not None else 0)
    metrics.amqp_blocked.set(1 if blocked else 0)
    now_confirmed = metrics.confirmed.value
    if now_confirmed != confirmed:
        metrics.last_confirm.set(wall.timestamp())
    return now_confirmed


async def drift_loop(
    core: SessionCore,
    outbox_relid: int,
    settings: Settings,
    problems: Problems,
    metrics: Metrics,
    others: Sequence[tuple[Settings, int]] = (),
) -> None:
    """Catch an outbox leaving the publication while streaming: its rows would be skipped.

    Every few seconds on a side connection with a statement timeout; a failed
    look is retried at the next one (it must never end the session). A drift
    is said at ERROR, turns readiness and `status` red, and names the fix.
    ``others``: the further outboxes of the slot and their OIDs, each watched alike
    (its problem under ``drift_key(table)``).
    """
    s = settings
    watches = [
        (
            each,
            DriftWatch(
                publication=each.publication,
                table=".".join(each.table_parts),
                slot=each.slot,
                outbox_relid=relid,
            ),
            DRIFT_KEY if index == 0 else drift_key(each.table),
        )
        for index, (each, relid) in enumerate([(settings, outbox_relid), *others])
    ]
    conn: psycopg.AsyncConnection[Any] | None = None
    failures = 0
    try:
        while True:
            await asyncio.sleep(DRIFT_CHECK_INTERVAL)
            try:
                if conn is None or conn.closed:
                    conn = await _side_connection(s.dsn, "cdc-relay drift check")
                looks = [
                    await within(checks.look_at_outbox(conn, each), DRIFT_CHECK_TIMEOUT + 1)
                    for each, _, _ in watches
                ]
            except (psycopg.Error, OSError, TimeoutError) as exc:
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "cannot check that publication %s covers the outbox (retrying every %.0fs): %s",
                    s.publication,
                    DRIFT_CHECK_INTERVAL,
                    one_line(str(exc)) or type(exc).__name__,
                )
                if conn is not None:
                    await conn.close()
                conn = None
                continue
            failures = 0
            for (_, watch, key), (relid, covered) in zip(watches, looks, strict=True):
                step = watch.observe(relid, covered, core.confirmed_commit_time, time.time())
                if step.error is not None:
                    log.error("%s", step.error)
                if step.problem is not None:
                    problems.report(key, step.problem)
                    metrics.ready.set(0)
                elif step.ended:
                    problems.clear(key)
                    if all(w.since is None for _, w, _ in watches):
                        metrics.ready.set(1)
                if step.end_session is not None:
                    raise SessionFailed(step.end_session)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


async def stats_loop(core: SessionCore, metrics: Metrics, interval: float) -> None:
    """Every ``interval`` seconds one line: the confirm rate, what is in flight, the flush."""
    last = metrics.confirmed_count()
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now, count = time.monotonic(), metrics.confirmed_count()
        rate = (count - last) / (now - last_t)
        log.info(
            "%.0f msg/s confirmed, %s",
            rate,
            core.describe(),
            extra={
                "messages_per_second": round(rate, 1),
                "in_flight": core.unconfirmed,
                "lsn": format_lsn(core.flush_lsn),
            },
        )
        last, last_t = count, now


async def _side_connection(dsn: str, name: str) -> psycopg.AsyncConnection[Any]:
    """A short-statement autocommit connection: a locked catalog must never stall a check."""
    conn = await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, connect_timeout=10, application_name=name
    )
    try:
        timeout_ms = int(DRIFT_CHECK_TIMEOUT * 1000)
        await conn.execute(f"SET statement_timeout = {timeout_ms}; SET lock_timeout = {timeout_ms}")
    except BaseException:
        await conn.close()
        raise
    return conn


# -- per process ---------------------------------------------------------------------

RETENTION_INTERVAL: Final = 60.0  # seconds between background retention passes
RETENTION_BATCH: Final = 500  # rows per DELETE in the background
RETENTION_PAUSE: Final = 0.05  # seconds between batches: a low rate, never a lock storm


SLOT_POLL_TIMEOUT: Final = 5.0  # statement and lock timeout of the slot poll's queries
# The slot poll's side connection, bounded in every step so a poll never outlives a
# few intervals (its thread cannot be cancelled, only bounded).
SLOT_POLL_CONNECTION: Final[dict[str, Any]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
    "application_name": "cdc-relay slot poll",
}


class SlotPoller:
    """Reads the slot's numbers (``report.poll``) on one side connection, kept between polls.

    Used from one task at a time, each poll in a worker thread; a failure closes
    the connection and the next poll opens another. ``busy`` while a poll runs:
    libpq must not be closed under a thread that is using the connection.
    """

    def __init__(self, settings: Settings, outboxes: Sequence[Settings] = ()) -> None:
        self.settings = settings
        self.outboxes = tuple(outboxes)  # several on the slot: dead letters summed over them
        self.busy = False
        self._conn: psycopg.Connection[Any] | None = None

    def poll(self) -> SlotStatus:
        s = self.settings
        self.busy = True
        try:
            if self._conn is None or self._conn.closed:
                self._conn = catalog.connect(
                    s.dsn,
                    statement_timeout=SLOT_POLL_TIMEOUT,
                    lock_timeout=SLOT_POLL_TIMEOUT,
                    **SLOT_POLL_CONNECTION,
                )
            return report.poll(self._conn, s, self.outboxes)
        except BaseException:
            self.close()
            raise
        finally:
            self.busy = False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


async def poll_slot(
    settings: Settings,
    metrics: Metrics,
    stop: asyncio.Event,
    checks_passed: asyncio.Event | None = None,
    outboxes: Sequence[Settings] = (),
) -> None:
    """Every ``--slot-poll-interval``: the slot's lag, retained WAL and dead letters, as metrics.

    Run by every relay, active or standing by, so the lag alert still works when
    the active one is gone. A failed poll is counted
    (``cdc_relay_slot_poll_failures_total``) and logged once until one succeeds;
    it never touches the stream. It starts once a session's startup checks passed
    (``checks_passed``), so a misconfiguration stays one line, the session's.
    """
    if checks_passed is not None:
        waiters = [asyncio.ensure_future(checks_passed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
    poller = SlotPoller(settings, outboxes)
    interval = settings.slot_poll_interval
    failures = 0
    try:
        while not stop.is_set():
            try:
                # No deadline of our own: the thread cannot be cancelled, and every step
                # of the connection is bounded (SLOT_POLL_CONNECTION, SLOT_POLL_TIMEOUT).
                status = await asyncio.to_thread(poller.poll)
            except (psycopg.Error, ConfigError, OSError) as exc:
                failures += 1
                metrics.slot_poll_failures.inc()
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "cannot read slot %s for the metrics (retrying every %.0fs): %s",
                    settings.slot,
                    interval,
                    one_line(str(exc)) or type(exc).__name__,
                )
            else:
                if failures:
                    log.info("slot %s readable for the metrics again", settings.slot)
                failures = 0
                metrics.observe_slot(status)
            await event_within(stop, interval)
    finally:
        if not poller.busy:  # else the poll's thread ends within its bounds; the process exits
            poller.close()


async def retain_outbox(
    settings: Settings,
    older_than: timedelta,
    stop: asyncio.Event,
    *,
    interval: float = RETENTION_INTERVAL,
    batch: int = RETENTION_BATCH,
    pause: float = RETENTION_PAUSE,
    on_pass: Callable[[int], None] | None = None,
) -> None:
    """``run --retention``: every ``interval`` seconds, prune rows older than ``older_than``.

    Runs beside the stream until ``stop`` is set. Each pass uses its own short
    connection and deletes ``batch`` rows per transaction with a pause between
    batches, so it never holds many locks or competes with the application. A
    failed pass is logged and retried at the next one: retention must never end
    the relay. Safe for delivery like ``prune`` (deletes are not published);
    ``on_pass`` gets the number of rows each pass deleted.
    """
    while not stop.is_set():
        try:
            deleted = await asyncio.to_thread(
                retention_pass, settings, older_than, batch, pause, stop
            )
        except (psycopg.Error, ConfigError, OSError) as exc:
            log.warning(
                "retention pass failed (retrying in %.0fs): %s", interval, one_line(str(exc))
            )
        else:
            if deleted:
                log.info("retention: deleted %d outbox row(s) older than %s", deleted, older_than)
            if on_pass is not None:
                on_pass(deleted)
        await event_within(stop, interval)

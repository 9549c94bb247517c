"""Run sessions: perform what the session core decides, and start again after any failure.

A session is one replication connection, one AMQP connection and one
dead-letter connection, alive together. Any failure ends the session: all
connections close, and the next session starts again from the slot's
confirmed position after a backoff with jitter. Nothing is retried inside a
session, so there is exactly one recovery path to test.

The decisions (what a frame means, which rows are dead letters, which LSN is
safe, when a status update is due) live in ``core.SessionCore`` and
``pg.schedule.StatusSchedule``; this module only moves bytes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from cdc_relay import state
from cdc_relay.acks import AckTrackerError
from cdc_relay.amqp import ConnectError, Outcome, Publisher, PublishFailed, UnpublishableMessage
from cdc_relay.backoff import reconnect_delay
from cdc_relay.config import Settings
from cdc_relay.core import (
    RECHECK_INTERVAL,
    STOP,
    BrokerLimits,
    PublishRefused,
    Recheck,
    SessionCore,
    SessionFailed,
)
from cdc_relay.deadletters import (
    DeadLetterSink,
    DeadLettersUnwritable,
    DeadLetterWriteFailed,
    DeadLetterWriter,
    PendingDeadLetter,
)
from cdc_relay.deadline import event_within, within
from cdc_relay.errors import ConfigError, FatalError, SlotMissing
from cdc_relay.health import (
    DRIFT_CHECK_INTERVAL,
    DRIFT_KEY,
    DriftWatch,
    FlushWatch,
    Problems,
    since_when,
)
from cdc_relay.lsn import format_lsn
from cdc_relay.metrics import Metrics
from cdc_relay.opening import (
    Connections,
    open_publisher,
    open_stream,
    recorded,
    take_slot,
    validate,
    validate_when_no_resync,
)
from cdc_relay.pg import checks
from cdc_relay.pg.liveness import PROBE_TIMEOUT, walsender_alive
from cdc_relay.pg.pgoutput import ProtocolError
from cdc_relay.pg.replication import ReplicationError, ReplicationStream
from cdc_relay.pg.retention import retain_outbox
from cdc_relay.pg.schedule import Probe, Send, StatusSchedule
from cdc_relay.redact import Redactor, one_line
from cdc_relay.router import Envelope, Router
from cdc_relay.state import Position, ResyncUnderWay, StateWriter, start_position

log = logging.getLogger("cdc_relay")

HEALTHY_SESSION_SECONDS: Final = 30.0  # a session this long resets the backoff
# After streaming once, a slot that vanished (a failover to a server whose copy was
# not ready, or still being promoted) is asked for every 0.5-1.5 s for this long,
# then the relay exits 78. A synced failover slot is there as soon as the promoted
# server accepts writes, so this only has to outlast a slow promotion.
SLOT_MISSING_GRACE: Final = 20.0
SLOT_MISSING_RETRY: Final = (0.5, 1.5)
STATE_CHECK_INTERVAL: Final = 1.0  # the state writer itself writes at most every few seconds
FINAL_STATUS_TIMEOUT: Final = 2.0
# After a nack, at most this long (and never more than --confirm-timeout) for the
# acks of the messages published before it.
SETTLE_AFTER_REFUSAL: Final = 5.0
SESSION_KEY: Final = "session"  # the problem key of a session that ended, until one is healthy
DRIFT_CHECK_TIMEOUT: Final = 5.0  # statement_timeout of the drift check's side connection

# Exceptions that end a session and are retried; anything else is a bug or a
# configuration error and ends the process.
SESSION_ERRORS: Final = (
    SessionFailed,
    DeadLetterWriteFailed,
    ReplicationError,
    PublishFailed,
    OSError,  # ConnectionError, the publisher's ConnectError
    psycopg.Error,
    TimeoutError,
)


class Relay:
    """Runs sessions until asked to stop; raises ConfigError for what retrying cannot fix."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.router = Router.from_settings(settings)
        self.limits = BrokerLimits.empty(settings.exchange)
        self.problems = Problems()
        # Where this process's sessions confirmed up to: the next one starts there.
        self.confirmed = PositionBox()
        self._stop = asyncio.Event()
        self._abort = asyncio.Event()

    def request_stop(self) -> None:
        """First call: stop cleanly. Second call: stop now, without waiting for confirms."""
        if self._stop.is_set():
            if not self._abort.is_set():
                log.warning("second stop request: exiting now; unconfirmed rows will be resent")
            self._abort.set()
        self._stop.set()

    def report_problem(self, key: str, text: str) -> None:
        """Say what is wrong (``key`` names the part: ``dead-letters``, ``resync``, ...).

        The state writer persists it within a second into the state row, where
        ``cdc-relay status`` shows it and turns unhealthy; reporting again keeps
        the start time. Any part of the relay may call this, from the event loop.
        """
        self.problems.report(key, text)

    def clear_problem(self, key: str) -> None:
        """That part is well again (a no-op if it reported nothing)."""
        self.problems.clear(key)

    async def run(self) -> None:
        retention = None
        if self.settings.retention is not None:
            retention = asyncio.create_task(
                retain_outbox(self.settings, self.settings.retention, self._stop),
                name="cdc-relay-retention",
            )
        try:
            await self._run_sessions()
        finally:
            if retention is not None:
                retention.cancel()
                await asyncio.gather(retention, return_exceptions=True)

    async def _run_sessions(self) -> None:
        attempt = 0
        streamed = False  # some session of this process has streamed from the slot
        checked = False  # some session of this process passed the startup checks
        missing_since: float | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            refused = False  # the session ended on a broker refusal (a nack)
            session = Session(
                self.settings,
                self.metrics,
                self.router,
                self.limits,
                self._stop,
                self._abort,
                self.confirmed,
                problems=self.problems,
            )
            try:
                await session.run()
                return  # a session only returns normally when asked to stop
            except DeadLettersUnwritable as exc:
                if not (checked or session.checked):
                    raise  # a first start: a setting to fix, say so at once (exit 78)
                # It was writable before (a grant revoked, the table dropped, or a
                # standby taking over): retry like a lock until it is fixed.
                self.problems.report(SESSION_KEY, f"the last session ended: {exc}")
                log.warning("session ended: %s (retrying)", exc)
            except SlotMissing as exc:
                if not streamed:
                    raise  # never streamed: a wrong --slot or --dsn, say so at once
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > SLOT_MISSING_GRACE:
                    raise ConfigError(
                        f"{exc} (retried for {SLOT_MISSING_GRACE:.0f}s: dropped, or after a "
                        "failover the promoted standby held no sync-ready copy; see docs/ha.md "
                        "and docs/recovery.md)"
                    ) from None
                log.warning(
                    "session ended: %s (a failover in progress? retrying for up to %.0fs)",
                    exc,
                    SLOT_MISSING_GRACE,
                )
            except (ConfigError, FatalError):
                raise
            except (ProtocolError, AckTrackerError) as exc:
                # The same bytes would come again: retrying cannot help.
                raise FatalError(f"cannot process the replication stream: {exc}") from exc
            except SESSION_ERRORS as exc:
                rejected = _certificate_rejected(exc)
                if rejected is not None:
                    raise ConfigError(rejected) from None
                refused = isinstance(exc, PublishRefused)
                # Persisted by the next session's state writer: `status` then says a
                # relay is running and why it keeps reconnecting, not "no relay".
                self.problems.report(SESSION_KEY, f"the last session ended: {_describe(exc)}")
                # Session.run logged "session ended" already, before closing connections.
            finally:
                self.metrics.ready.set(0)
                checked = checked or session.checked
                if session.streamed:
                    streamed, missing_since = True, None
            if time.monotonic() - started > HEALTHY_SESSION_SECONDS or session.made_progress:
                attempt = 0
            delay = self._backoff(attempt, refused)
            if missing_since is not None:
                delay = random.uniform(*SLOT_MISSING_RETRY)  # the slot may appear any moment
            attempt += 1
            self.metrics.reconnects.inc()
            log.info("reconnecting in %.1fs", delay)
            await event_within(self._stop, delay)

    def _backoff(self, attempt: int, refused: bool) -> float:
        """Exponential backoff with full jitter; capped after a refusal (backoff.py says why)."""
        s = self.settings
        return reconnect_delay(
            attempt, s.reconnect_min, s.reconnect_max, refused=refused, uniform=random.uniform
        )


# libpq's words for a server certificate it refuses (said by the client: no SQLSTATE).
_PG_CERTIFICATE_REJECTED: Final = ("certificate verify failed", "does not match host name")


def _certificate_rejected(exc: BaseException) -> str | None:
    """The error line for a refused server certificate, else None.

    A wrong CA or host name fails the same way on every attempt: the operator must
    fix the setting, so the process exits 78 instead of retrying forever.
    """
    if isinstance(exc, ConnectError) and exc.certificate_rejected:
        return f"{exc}; check cacertfile and the host name in --amqp-url"
    text = one_line(str(exc))
    if isinstance(exc, psycopg.OperationalError) and any(
        words in text for words in _PG_CERTIFICATE_REJECTED
    ):
        return f"cannot connect to Postgres: {text}; check sslrootcert and the host in --dsn"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SessionFailed | DeadLetterWriteFailed | ReplicationError | PublishFailed):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).strip()}"


class PositionBox:
    """The highest position a session of this process confirmed, kept between sessions."""

    def __init__(self) -> None:
        self.position: Position | None = None

    def keep(self, position: Position) -> None:
        if (
            self.position is None
            or position.lsn >= self.position.lsn
            or (
                (position.system_identifier, position.timeline)
                != (self.position.system_identifier, self.position.timeline)
            )
        ):
            self.position = position


class Session:
    """One replication stream, one publisher, one dead-letter sink, and the core between them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        router: Router,
        limits: BrokerLimits,
        stop: asyncio.Event,
        abort: asyncio.Event,
        confirmed: PositionBox | None = None,
        problems: Problems | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.router = router
        self.limits = limits
        self.stop = stop
        self.abort = abort
        self.confirmed = confirmed or PositionBox()
        self.wal: tuple[str, int] | None = None  # (system identifier, timeline) streamed from
        self.problems = problems if problems is not None else Problems()
        self.conns = Connections()
        self.core: SessionCore | None = None
        self.sink: DeadLetterSink | None = None
        self.failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status_wakeup = asyncio.Event()
        self.closing = False
        self.streamed = False  # reached streaming: the slot existed and was ours
        self.checked = False  # the startup checks passed once (the dead-letter table too)
        self.end_logged = False

    @property
    def made_progress(self) -> bool:
        return self.core is not None and self.core.made_progress

    def fail(self, exc: BaseException) -> None:
        if not self.failure.done() and not self.closing:
            self.failure.set_exception(exc)
            self._log_end(exc)

    def _log_end(self, exc: BaseException) -> None:
        """Say the session ended when it does: closing a partitioned peer can take seconds."""
        if not self.end_logged and isinstance(exc, SESSION_ERRORS):
            if _certificate_rejected(exc) is None:
                log.warning("session ended: %s", _describe(exc))
            self.end_logged = True

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except SESSION_ERRORS as exc:
            self._log_end(exc)
            raise
        finally:
            self.closing = True  # what our own closing causes is not a failure
            if self.core is not None and self.wal is not None:
                flush = self.core.tracker.flush_lsn
                self.confirmed.keep(Position(flush, *self.wal))
            await _bounded(self.conns.close(), "closing connections")
            if self.failure.done() and not self.failure.cancelled():
                self.failure.exception()  # retrieved: it was raised or superseded

    async def _run(self) -> None:
        s, conns = self.settings, self.conns
        conns.stream = stream = await open_stream(s)
        # One clear line for any misconfiguration, before the slot; waits out a resync.
        facts = await validate_when_no_resync(s, self.stop)
        if facts is None:
            return  # asked to stop while a resync ran
        self.checked = True
        messages = facts.emit_key is not None
        system, timeline, wal_end = await stream.identify_system()
        known = [p for p in (self.confirmed.position, await recorded(s)) if p is not None]
        start = start_position(known, system, timeline, wal_end)
        stood_by = await take_slot(stream, s, self.stop, start, messages=messages)
        if stood_by is None:
            return  # asked to stop while standing by
        # Again now that the slot is ours: its position moved while another relay held
        # it, and a resync may have started (and left its new slot idle) meanwhile.
        try:
            facts = await validate(s)
        except ResyncUnderWay as exc:
            raise SessionFailed(f"{exc}; releasing the slot") from None
        if (facts.emit_key is not None) != messages:
            raise SessionFailed("emitted messages were enabled or removed meanwhile")
        self.wal = (system, timeline)
        # The server starts at max(start, the slot's saved position); so does the tracker.
        start_flush = max(start, facts.confirmed_flush_lsn)
        self.core = core = SessionCore(
            outbox_relid=facts.outbox_relid,
            table=s.table,
            router=self.router,
            start_flush=start_flush,
            max_message_size=s.max_message_size,
            dead_letter_unroutable=s.on_unroutable == "deadletter",
            message_prefix=s.message_prefix,
            emit_key=facts.emit_key,
            limits=self.limits,
            counters=self.metrics,
            observe_commit_to_confirm=self.metrics.commit_to_confirm.observe,
        )
        conns.publisher = publisher = await open_publisher(s, self._on_outcome)
        self.limits.connected()  # what an earlier connection was refused is asked again
        conns.dead_letters = await DeadLetterWriter.connect(s.dsn, s.dead_letter_table)
        self.sink = sink = DeadLetterSink(conns.dead_letters, self._stored)
        conns.state = StateWriter(s.dsn, state.table_name(s), s.slot, system_identifier=system)
        log.info(
            "streaming from slot %s (publication %s, confirmed position %s) to %s",
            s.slot,
            s.publication,
            format_lsn(start_flush),
            publisher.connected_url,
            extra={"slot": s.slot, "lsn": format_lsn(start_flush)},
        )
        if start > facts.confirmed_flush_lsn:
            log.info(
                "started past the slot's saved position %s: %s was confirmed already",
                format_lsn(facts.confirmed_flush_lsn),
                format_lsn(start),
            )
        self.problems.clear(DRIFT_KEY)  # validation just found the publication covering it
        self.metrics.ready.set(1)
        self.streamed = True
        pump = asyncio.create_task(self._pump(stream, publisher, core), name="cdc-relay-pump")
        status = asyncio.create_task(self._status_loop(stream, core), name="cdc-relay-status")
        helpers = [
            asyncio.create_task(sink.run(), name="cdc-relay-dead-letters"),
            asyncio.create_task(self._stats_loop(core), name="cdc-relay-stats"),
            asyncio.create_task(self._state_loop(core, conns.state), name="cdc-relay-state"),
        ]
        if facts.outbox_relid:  # a table-less outbox has no table to leave the publication
            helpers.append(
                asyncio.create_task(
                    self._drift_loop(core, facts.outbox_relid), name="cdc-relay-drift"
                )
            )
        for task in (pump, status, *helpers):
            task.add_done_callback(self._task_done)
        stop_wait = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait(
                [pump, status, *helpers, stop_wait, self.failure],
                return_when=asyncio.FIRST_COMPLETED,
            )
            self._raise_failure()
            await self._stop_cleanly(pump, publisher, core, sink)
            status.cancel()
            await asyncio.gather(status, return_exceptions=True)
            await within(self._send_status(stream, core), FINAL_STATUS_TIMEOUT)
            with contextlib.suppress(TimeoutError):
                await within(
                    conns.state.maybe_write(
                        time.monotonic(),
                        core.confirmed_commit_time,
                        core.tracker.flush_lsn,
                        final=True,
                    ),
                    FINAL_STATUS_TIMEOUT,
                )
            with contextlib.suppress(TimeoutError):
                await within(conns.state.retire(), FINAL_STATUS_TIMEOUT)
            log.info("stopped; confirmed position %s", format_lsn(core.tracker.flush_lsn))
        finally:
            stop_wait.cancel()
            if isinstance(self._failure_exception(), PublishRefused) and not self.abort.is_set():
                await self._settle_after_refusal(pump, publisher)
            tasks = [pump, status, *helpers]
            for task in tasks:
                task.cancel()
            await _bounded(asyncio.gather(*tasks, stop_wait, return_exceptions=True), "tasks")
            # Report what was confirmed before whatever ended the session, so the
            # next one does not replay it (best effort: the link may be gone).
            if not self.stop.is_set() and core.status_due:
                with contextlib.suppress(Exception):
                    await within(self._send_status(stream, core), FINAL_STATUS_TIMEOUT)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """Whatever ends a session task ends the session (the pump returns only at STOP)."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(exc)
        elif not (task.get_name() == "cdc-relay-pump" and self.core and self.core.stop_requested):
            self.fail(SessionFailed(f"{task.get_name()} ended unexpectedly"))

    def _raise_failure(self) -> None:
        if self.failure.done():
            self.failure.result()

    def _failure_exception(self) -> BaseException | None:
        if self.failure.done() and not self.failure.cancelled():
            return self.failure.exception()
        return None

    async def _settle_after_refusal(self, pump: asyncio.Task[None], publisher: Publisher) -> None:
        """After a nack, take the acks of what was published before it, then end.

        RabbitMQ nacks a refused message at once but acks persistent ones only
        after its fsync, so the nack usually overtakes them. Ending the session
        at the nack would replay what the broker took; into a bounded queue
        (``x-overflow: reject-publish``) the same tail would be refused again,
        for ever. Nothing new is published meanwhile.
        """
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        wait = min(self.settings.confirm_timeout, SETTLE_AFTER_REFUSAL)
        with contextlib.suppress(Exception):
            await publisher.wait_confirmed(wait)

    async def _stop_cleanly(
        self,
        pump: asyncio.Task[None],
        publisher: Publisher,
        core: SessionCore,
        sink: DeadLetterSink,
    ) -> None:
        """Finish the transaction being read, stop reading, wait for confirms and dead letters.

        All of it within one --shutdown-timeout; a second SIGTERM/SIGINT skips the waiting.
        What is not confirmed by then is sent again by the next run (at least once).
        """
        deadline = time.monotonic() + self.settings.shutdown_timeout
        abort = asyncio.ensure_future(self.abort.wait())

        async def until(awaitable: Awaitable[Any]) -> bool:
            """Wait for one step, the deadline, a failure or an abort; True if the step finished."""
            step = asyncio.ensure_future(awaitable)
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.wait(
                [step, self.failure, abort], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            self._raise_failure()
            if not step.done():
                step.cancel()
                return False
            return step.result() is not False

        try:
            if core.in_transaction and not pump.done():
                core.stop_requested = True  # the pump returns at the next Commit
                await until(asyncio.shield(pump))
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            if self.abort.is_set():
                return
            drained = await until(publisher.wait_confirmed(self.settings.shutdown_timeout))
            stored = drained and await until(sink.wait_idle())
            if not (drained and stored):
                log.warning(
                    "stopping with %d unconfirmed message(s); they will be sent again",
                    core.tracker.unconfirmed,
                )
        finally:
            abort.cancel()

    # -- the hot loop ------------------------------------------------------------

    async def _pump(
        self, stream: ReplicationStream, publisher: Publisher, core: SessionCore
    ) -> None:
        receive = core.receive
        publish = publisher.publish
        sink = self.sink
        assert sink is not None
        while True:
            for frame in await stream.read_frames():
                action = receive(frame)
                if action is None:
                    continue
                if type(action) is Recheck:
                    action = await self._recheck(publisher, core, action)
                if type(action) is Envelope:
                    try:
                        await publish(core.last_seq, action)
                    except UnpublishableMessage as exc:
                        action = core.unpublishable(core.last_seq, str(exc))
                    else:
                        continue
                if action is STOP:
                    return
                assert type(action) is PendingDeadLetter
                await sink.put(action)  # waits while the sink is full
            if core.status_due:
                self.status_wakeup.set()

    async def _recheck(
        self, publisher: Publisher, core: SessionCore, recheck: Recheck
    ) -> Envelope | PendingDeadLetter:
        """A remembered refusal would dead-letter this row: ask the broker again if it is time.

        The decision (when, and what the answer means) is ``BrokerLimits``'s; this
        only performs the trial publish (``Publisher.try_publish`` says what it proves).
        """
        limits, envelope = self.limits, recheck.envelope
        exchange, size, now = envelope.exchange, len(envelope.body), time.monotonic()
        if limits.recheck_due(exchange, size, now):
            try:
                error = await publisher.try_publish(envelope)
            except UnpublishableMessage:
                pass  # no answer to learn from; the remembered refusal stands
            else:
                if limits.rechecked(exchange, size, error, now):
                    log.info(
                        "the broker takes publishes to exchange %r again (a trial publish, "
                        "rolled back): no longer dead-lettering on its earlier refusal",
                        exchange,
                    )
                elif error is not None:
                    log.warning(
                        "the broker still refuses publishes to exchange %r (%s): its rows are "
                        "dead-lettered; asking again in %.0fs",
                        exchange,
                        error,
                        RECHECK_INTERVAL,
                    )
        return core.rechecked(recheck)

    # -- broker outcomes and stored dead letters -------------------------------------

    def _on_outcome(self, outcome: Outcome) -> None:
        """One report from the publisher (called from its protocol: must not block)."""
        core, sink = self.core, self.sink
        assert core is not None and sink is not None
        try:
            letters = core.settle(outcome, time.time())
        except SessionFailed as exc:
            self.fail(exc)
            return
        if letters:
            sink.put_nowait(letters)
        if core.status_due:
            self.status_wakeup.set()

    def _stored(self, seqs: list[int]) -> None:
        core = self.core
        assert core is not None
        core.stored(seqs, time.time())
        if core.status_due:
            self.status_wakeup.set()

    # -- status updates -----------------------------------------------------------

    async def _send_status(
        self, stream: ReplicationStream, core: SessionCore, reply: bool = False
    ) -> None:
        write, flush = core.status_positions()
        await stream.send_status(write, flush, flush, reply)
        core.status_sent(flush)
        self.metrics.flush_lsn.set(flush)
        self.metrics.received_lsn.set(core.received_lsn)

    async def _status_loop(self, stream: ReplicationStream, core: SessionCore) -> None:
        """Perform what the schedule decides; the decisions are in pg/schedule.py."""
        s = self.settings
        schedule = StatusSchedule(s.status_interval, s.pg_timeout, time.monotonic())
        wakeup = self.status_wakeup
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
                await self._send_status(stream, core, decision.reply_requested)
                schedule.sent(now)

    async def _state_loop(self, core: SessionCore, writer: StateWriter) -> None:
        """Record where the relay is and what is wrong (throttled in state.py).

        The position is for `resync` without --since; the health (problems, a
        blocked broker, a flush that waits) for `status` in another process.
        """
        publisher = self.conns.publisher
        # The row is read by other processes and roles: no password of ours goes there.
        redact = Redactor([self.settings.dsn, *self.settings.amqp_urls])
        started = time.monotonic()
        watch = FlushWatch()
        blocked_since: datetime | None = None
        while True:
            await asyncio.sleep(STATE_CHECK_INTERVAL)
            now = time.monotonic()
            if core.made_progress or now - started > HEALTHY_SESSION_SECONDS:
                self.problems.clear(SESSION_KEY)
            await writer.maybe_write(now, core.confirmed_commit_time, core.tracker.flush_lsn)
            wall = datetime.now(UTC)
            blocked = publisher is not None and publisher.blocked
            blocked_since = since_when(blocked, blocked_since, wall)
            waiting = watch.update(core.tracker.flush_lsn, core.tracker.unconfirmed, wall)
            problem, problem_since = self.problems.summary()
            if problem is not None:
                problem = redact(problem)
            await writer.maybe_report(now, (problem, problem_since, blocked_since, waiting))

    async def _drift_loop(self, core: SessionCore, outbox_relid: int) -> None:
        """Catch the outbox leaving the publication while streaming: its rows would be skipped.

        Every few seconds on a side connection with a statement timeout; a failed
        look is retried at the next one (it must never end the session). A drift
        is said at ERROR, turns readiness and `status` red, and names the fix.
        """
        s = self.settings
        watch = DriftWatch(
            publication=s.publication,
            table=".".join(s.table_parts),
            slot=s.slot,
            outbox_relid=outbox_relid,
        )
        conn: psycopg.AsyncConnection[Any] | None = None
        failures = 0
        try:
            while True:
                await asyncio.sleep(DRIFT_CHECK_INTERVAL)
                try:
                    if conn is None or conn.closed:
                        conn = await _side_connection(s.dsn, "cdc-relay drift check")
                    relid, covered = await within(
                        checks.look_at_outbox(conn, s), DRIFT_CHECK_TIMEOUT + 1
                    )
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    failures += 1
                    log.log(
                        logging.WARNING if failures == 1 else logging.DEBUG,
                        "cannot check that publication %s covers the outbox (retrying every "
                        "%.0fs): %s",
                        s.publication,
                        DRIFT_CHECK_INTERVAL,
                        one_line(str(exc)) or type(exc).__name__,
                    )
                    if conn is not None:
                        await conn.close()
                    conn = None
                    continue
                failures = 0
                step = watch.observe(relid, covered, core.confirmed_commit_time, time.time())
                if step.error is not None:
                    log.error("%s", step.error)
                if step.problem is not None:
                    self.problems.report(DRIFT_KEY, step.problem)
                    self.metrics.ready.set(0)
                elif step.ended:
                    self.problems.clear(DRIFT_KEY)
                    self.metrics.ready.set(1)
                if step.end_session is not None:
                    raise SessionFailed(step.end_session)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _stats_loop(self, core: SessionCore) -> None:
        interval = self.settings.stats_interval
        last = self.metrics.confirmed_count()
        last_t = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, count = time.monotonic(), self.metrics.confirmed_count()
            rate = (count - last) / (now - last_t)
            log.info(
                "%.0f msg/s confirmed, %s",
                rate,
                core.describe(),
                extra={
                    "messages_per_second": round(rate, 1),
                    "in_flight": core.tracker.unconfirmed,
                    "lsn": format_lsn(core.tracker.flush_lsn),
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


async def _bounded(awaitable: Awaitable[Any], what: str, timeout: float = 10.0) -> None:
    """Cleanup must never hang a relay that is trying to recover."""
    try:
        await within(awaitable, timeout)
    except TimeoutError:
        log.error("%s took longer than %.0fs; abandoning it", what, timeout)

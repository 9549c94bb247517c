"""One session: a replication stream, a publisher and a dead-letter sink, with the core between.

A session is one replication connection, one AMQP connection and one
dead-letter connection, alive together; any failure ends it (``relay.py``
starts the next). The decisions live in ``core.SessionCore``; the loops that
run beside the stream (status updates, the state row, the drift check, the
stats line) live in ``loops.py``. This module is the session's lifecycle:
open, stream, stop, settle, close; it only moves bytes and waits.

Its end of life is in one place. The tasks belong to one ``SessionTasks``: the
first failure of any of them (or of a publisher callback) ends the session.
Then, in order (``_stream``):

1. clean stop (``_stop_cleanly``): asked to stop, finish the transaction being
   read, wait for confirms and stored dead letters, all within
   ``--shutdown-timeout``; a second signal (``abort``) skips the waiting;
2. final reports: a status update with the confirmed position, the state row;
3. wind-down (always): after a refusal (a nack) take the acks of what was
   published before it (``_settle_after_refusal``); cancel every task; after a
   failure report what was confirmed, best effort;
4. close (``run``): keep the confirmed position for the next session, close
   every connection within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from cdc_relay import accel, loops, state
from cdc_relay.amqp import ConnectError, Outcome, Publisher, PublishFailed, UnpublishableMessage
from cdc_relay.config import Settings
from cdc_relay.core import STOP, Outbox, PublishRefused, SessionCore, SessionFailed
from cdc_relay.deadletters import DeadLetterSink, DeadLetterWriter
from cdc_relay.deadline import within
from cdc_relay.envelope import Envelope
from cdc_relay.errors import SessionError
from cdc_relay.health import (
    DRIFT_KEY,
    Problems,
    drift_key,
)
from cdc_relay.letters import PendingDeadLetter
from cdc_relay.limits import RECHECK_INTERVAL, BrokerLimits, Recheck
from cdc_relay.lsn import format_lsn
from cdc_relay.metrics import Metrics
from cdc_relay.opening import (
    Connections,
    identify,
    open_publisher,
    open_stream,
    recorded,
    take_slot,
    validate,
    validate_when_no_resync,
)
from cdc_relay.pg.checks import StartupFacts
from cdc_relay.pg.failures import certificate_rejected as pg_certificate_rejected
from cdc_relay.pg.replication import ReplicationStream
from cdc_relay.resync_guard import ResyncUnderWay
from cdc_relay.router import Router
from cdc_relay.state import Position, StateWriter, start_position
from cdc_relay.tasks import SessionTasks

log = logging.getLogger("cdc_relay")

FINAL_STATUS_TIMEOUT: Final = 2.0
CLEANUP_TIMEOUT: Final = 10.0  # cancelling the tasks, closing the connections: each at most
# After a nack, at most this long (and never more than --confirm-timeout) for the
# acks of the messages published before it.
SETTLE_AFTER_REFUSAL: Final = 5.0

# Exceptions that end a session and are retried; anything else is a bug or a
# configuration error and ends the process. Each I/O layer of ours raises a
# SessionError; the libraries' own errors that reach the session unwrapped are
# the other three (OSError includes ConnectionError).
SESSION_ERRORS: Final = (SessionError, OSError, psycopg.Error, TimeoutError)


def certificate_rejected(exc: BaseException) -> str | None:
    """The error line for a refused server certificate (RabbitMQ or Postgres), else None.

    A wrong CA or host name fails the same way on every attempt: the operator must
    fix the setting, so the process exits 78 instead of retrying forever.
    """
    if isinstance(exc, ConnectError) and exc.certificate_rejected:
        return f"{exc}; check cacertfile and the host name in --amqp-url"
    return pg_certificate_rejected(exc)


def reason_code(exc: BaseException) -> str | None:
    """The reason code (``reasons``) of a broker failure that ended a session, else None."""
    if isinstance(exc, (SessionFailed, PublishFailed)):
        return exc.code
    return None


def describe(exc: BaseException) -> str:
    """One line for what ended a session: our own errors say it themselves."""
    if isinstance(exc, SessionError):
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


@dataclass(slots=True)
class Streaming:
    """What an opened session streams with: the parts its end of life works on."""

    stream: ReplicationStream
    publisher: Publisher
    core: SessionCore
    sink: DeadLetterSink
    state: StateWriter
    outbox_relid: int
    outbox_relids: tuple[int, ...] = ()  # every outbox's, with several (``--config``)


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
        checks_passed: asyncio.Event | None = None,
        outboxes: Sequence[Settings] = (),
    ) -> None:
        self.settings = settings
        # Every outbox table of the slot (``--config``), ``settings`` (the first) included.
        self.outboxes = tuple(outboxes) or (settings,)
        self.checks_passed = checks_passed  # set once the startup checks pass (shared)
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
        self.tasks = SessionTasks(on_failure=self._log_end)
        self.status_wakeup = asyncio.Event()
        self.streamed = False  # reached streaming: the slot existed and was ours
        self.checked = False  # the startup checks passed once (the dead-letter table too)
        self.end_logged = False

    @property
    def made_progress(self) -> bool:
        return self.core is not None and self.core.made_progress

    def _log_end(self, exc: BaseException) -> None:
        """Say the session ended when it does: closing a partitioned peer can take seconds."""
        if not self.end_logged and isinstance(exc, SESSION_ERRORS):
            if certificate_rejected(exc) is None:
                code = reason_code(exc)
                extra = {"reason": code} if code is not None else None
                log.warning("session ended: %s", describe(exc), extra=extra)
            self.end_logged = True

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        """Open, stream until a stop or a failure, end (the module docstring's phases)."""
        try:
            parts = await self._open()
            if parts is not None:
                await self._stream(parts)
        except SESSION_ERRORS as exc:
            self._log_end(exc)
            raise
        finally:
            self.tasks.closing = True  # what our own closing causes is not a failure
            if self.core is not None and self.wal is not None:
                self.confirmed.keep(Position(self.core.flush_lsn, *self.wal))
            await _bounded(self.conns.close(), "closing connections")

    async def _open(self) -> Streaming | None:
        """Connect, validate, take the slot; None if asked to stop meanwhile.

        Sets ``core``, ``sink`` and ``conns`` (the unit tests replace this method
        with one that opens fakes: tests/test_session.py).
        """
        s, conns = self.settings, self.conns
        conns.stream = stream = await open_stream(s)
        # One clear line for any misconfiguration, before the slot; waits out a resync.
        facts = await validate_when_no_resync(s, self.stop, self.outboxes)
        if facts is None:
            return None  # asked to stop while a resync ran
        self.checked = True
        if self.checks_passed is not None:
            self.checks_passed.set()
        messages = facts.emit_key is not None
        system, timeline, wal_end = await identify(stream, s)
        known = [p for p in (self.confirmed.position, await recorded(s)) if p is not None]
        start = start_position(known, system, timeline, wal_end)
        stood_by = await take_slot(
            stream,
            s,
            self.stop,
            start,
            messages=messages,
            on_standby=lambda: self.metrics.set_role("standby"),
        )
        if stood_by is None:
            return None  # asked to stop while standing by
        # Again now that the slot is ours: its position moved while another relay held
        # it, and a resync may have started (and left its new slot idle) meanwhile.
        try:
            facts = await validate(s, self.outboxes)
        except ResyncUnderWay as exc:
            raise SessionFailed(f"{exc}; releasing the slot") from None
        if (facts.emit_key is not None) != messages:
            raise SessionFailed("emitted messages were enabled or removed meanwhile")
        self.wal = (system, timeline)
        # The server starts at max(start, the slot's saved position); so does the tracker.
        start_flush = max(start, facts.confirmed_flush_lsn)
        self.core = core = SessionCore(
            outboxes=self._outboxes(facts),
            start_flush=start_flush,
            max_message_size=s.max_message_size,
            dead_letter_unroutable=s.on_unroutable == "deadletter",
            message_prefix=s.message_prefix,
            emit_key=facts.emit_key,
            limits=self.limits,
            counters=self.metrics,
            observe_commit_to_confirm=self.metrics.commit_to_confirm.observe,
        )
        conns.publisher = publisher = await open_publisher(s, self._on_outcome, self.outboxes)
        self.limits.connected()  # what an earlier connection was refused is asked again
        by_outbox = {o.table: o.dead_letter_table for o in self.outboxes[1:]}
        conns.dead_letters = await DeadLetterWriter.connect(s.dsn, s.dead_letter_table, by_outbox)
        self.sink = sink = DeadLetterSink(conns.dead_letters, self._stored)
        conns.state = writer = StateWriter(
            s.dsn, state.table_name(s), s.slot, system_identifier=system
        )
        hot_path = accel.choice()
        log.info(
            "streaming from slot %s (publication %s, confirmed position %s) to %s; hot path: %s",
            s.slot,
            s.publication,
            format_lsn(start_flush),
            publisher.connected_url,
            hot_path.implementation,
            extra={
                "slot": s.slot,
                "lsn": format_lsn(start_flush),
                "implementation": hot_path.implementation,
            },
        )
        if start > facts.confirmed_flush_lsn:
            log.info(
                "started past the slot's saved position %s: %s was confirmed already",
                format_lsn(facts.confirmed_flush_lsn),
                format_lsn(start),
            )
        self.problems.clear(DRIFT_KEY)  # validation just found the publication covering it
        for other in self.outboxes[1:]:
            self.problems.clear(drift_key(other.table))
        self.metrics.ready.set(1)
        self.metrics.set_role("active")
        self.streamed = True
        return Streaming(
            stream, publisher, core, sink, writer, facts.outbox_relid, facts.outbox_relids
        )

    def _outboxes(self, facts: StartupFacts) -> list[Outbox]:
        """The core's outboxes: each table's OID (from validation), router and counters."""
        relids = facts.outbox_relids or (facts.outbox_relid,)
        return [
            Outbox(
                relid,
                each.table,
                self.router if index == 0 else Router.from_settings(each),
                self.metrics.table(each.table),
            )
            for index, (each, relid) in enumerate(zip(self.outboxes, relids, strict=True))
        ]

    async def _stream(self, parts: Streaming) -> None:
        """Run the session's tasks until a stop or the first failure, then end in phases."""
        tasks, core, stream = self.tasks, parts.core, parts.stream
        pump = tasks.start(
            "cdc-relay-pump",
            self._pump(stream, parts.publisher, core),
            may_return=lambda: core.stop_requested,  # it returns only at STOP
        )
        s, metrics, problems = self.settings, self.metrics, self.problems
        status = tasks.start(
            "cdc-relay-status",
            loops.status_loop(stream, core, s, metrics, self.status_wakeup),
        )
        tasks.start("cdc-relay-dead-letters", parts.sink.run())
        tasks.start("cdc-relay-stats", loops.stats_loop(core, metrics, s.stats_interval))
        tasks.start(
            "cdc-relay-state",
            loops.state_loop(core, parts.state, parts.publisher, problems, s, metrics),
        )
        if parts.outbox_relid:  # a table-less outbox has no table to leave the publication
            tasks.start(
                "cdc-relay-drift",
                loops.drift_loop(
                    core,
                    parts.outbox_relid,
                    s,
                    problems,
                    metrics,
                    list(zip(self.outboxes[1:], parts.outbox_relids[1:], strict=True)),
                ),
            )
        try:
            await tasks.wait_any(self.stop.wait())
            tasks.raise_failure()
            await self._stop_cleanly(pump, parts)
            await tasks.cancel(status)
            await self._final_reports(parts)
        finally:
            await self._wind_down(pump, parts)

    async def _stop_cleanly(self, pump: asyncio.Task[None], parts: Streaming) -> None:
        """Finish the transaction being read, stop reading, wait for confirms and dead letters.

        All of it within one --shutdown-timeout; a second SIGTERM/SIGINT skips the waiting.
        What is not confirmed by then is sent again by the next run (at least once).
        """
        tasks, core, abort = self.tasks, parts.core, self.abort
        deadline = time.monotonic() + self.settings.shutdown_timeout

        def left() -> float:
            return deadline - time.monotonic()

        if core.in_transaction and not pump.done():
            core.request_stop()  # the pump returns at the next Commit
            await tasks.until(asyncio.shield(pump), abort, left())
        await tasks.cancel(pump)
        if abort.is_set():
            return
        wait_confirmed = parts.publisher.wait_confirmed(self.settings.shutdown_timeout)
        drained = await tasks.until(wait_confirmed, abort, left())
        stored = drained and await tasks.until(parts.sink.wait_idle(), abort, left())
        if not (drained and stored):
            log.warning(
                "stopping with %d unconfirmed message(s); they will be sent again",
                core.unconfirmed,
            )

    async def _final_reports(self, parts: Streaming) -> None:
        """After a clean stop: the confirmed position to Postgres and to the state row."""
        core, writer = parts.core, parts.state
        await within(loops.send_status(parts.stream, core, self.metrics), FINAL_STATUS_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await within(
                writer.maybe_write(
                    time.monotonic(), core.confirmed_commit_time, core.flush_lsn, final=True
                ),
                FINAL_STATUS_TIMEOUT,
            )
        with contextlib.suppress(TimeoutError):
            await within(writer.retire(), FINAL_STATUS_TIMEOUT)
        log.info("stopped; confirmed position %s", format_lsn(core.flush_lsn))

    async def _wind_down(self, pump: asyncio.Task[None], parts: Streaming) -> None:
        """Always, last: settle after a refusal, cancel every task, report what was confirmed."""
        tasks, core = self.tasks, parts.core
        if isinstance(tasks.first_failure, PublishRefused) and not self.abort.is_set():
            await self._settle_after_refusal(pump, parts.publisher)
        await _bounded(tasks.cancel_all(), "tasks")
        # Report what was confirmed before whatever ended the session, so the
        # next one does not replay it (best effort: the link may be gone).
        if not self.stop.is_set() and core.status_due:
            with contextlib.suppress(Exception):
                await within(
                    loops.send_status(parts.stream, core, self.metrics), FINAL_STATUS_TIMEOUT
                )

    async def _settle_after_refusal(self, pump: asyncio.Task[None], publisher: Publisher) -> None:
        """After a nack, take the acks of what was published before it, then end.

        RabbitMQ nacks a refused message at once but acks persistent ones only
        after its fsync, so the nack usually overtakes them. Ending the session
        at the nack would replay what the broker took; into a bounded queue
        (``x-overflow: reject-publish``) the same tail would be refused again,
        for ever. Nothing new is published meanwhile (the core reads nothing more).
        """
        await self.tasks.cancel(pump)
        wait = min(self.settings.confirm_timeout, SETTLE_AFTER_REFUSAL)
        with contextlib.suppress(Exception):
            await publisher.wait_confirmed(wait)

    # -- the hot loop ------------------------------------------------------------

    async def _pump(
        self, stream: ReplicationStream, publisher: Publisher, core: SessionCore
    ) -> None:
        publish, publish_nowait = publisher.publish, publisher.publish_nowait
        sink = self.sink
        assert sink is not None
        while True:
            frames = await stream.read_frames()
            receive_many = core.receive_many  # per batch: a failed core refuses (its error state)
            i, end = 0, len(frames)
            while i < end:
                i, action = receive_many(frames, i)  # up to the next frame with an action
                if action is None:
                    break  # the batch is used up
                if type(action) is Recheck:
                    action = await self._recheck(publisher, core, action)
                if type(action) is Envelope:
                    try:
                        if not publish_nowait(core.last_seq, action):  # no coroutine if room
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
            self.tasks.fail(exc)
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


async def _bounded(awaitable: Awaitable[Any], what: str) -> None:
    """Cleanup must never hang a relay that is trying to recover."""
    timeout = CLEANUP_TIMEOUT
    try:
        await within(awaitable, timeout)
    except TimeoutError:
        log.error("%s took longer than %.0fs; abandoning it", what, timeout)

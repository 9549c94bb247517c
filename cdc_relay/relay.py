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
import re
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from cdc_relay.acks import AckTrackerError
from cdc_relay.amqp import (
    ConnectError,
    ExchangeError,
    Outcome,
    Publisher,
    PublishFailed,
    UnpublishableMessage,
)
from cdc_relay.amqp.replies import ACCESS_REFUSED
from cdc_relay.config import Settings
from cdc_relay.core import STOP, BrokerLimits, PendingDeadLetter, SessionCore, SessionFailed
from cdc_relay.deadletters import DeadLetterWriter
from cdc_relay.errors import ConfigError, FatalError
from cdc_relay.lsn import format_lsn
from cdc_relay.metrics import Metrics
from cdc_relay.pg import admin
from cdc_relay.pg.pgoutput import ProtocolError
from cdc_relay.pg.replication import (
    SQLSTATE_PREREQUISITE_STATE,
    SQLSTATE_UNDEFINED_OBJECT,
    ReplicationError,
    ReplicationStream,
    SlotInUse,
)
from cdc_relay.pg.schedule import Dead, Send, StatusSchedule, effective_pg_timeout
from cdc_relay.redact import one_line
from cdc_relay.router import Envelope, Router

log = logging.getLogger("cdc_relay")

HEALTHY_SESSION_SECONDS: Final = 30.0  # a session this long resets the backoff
VALIDATE_TIMEOUT: Final = 30.0  # startup checks must answer within this
STANDBY_RETRY: Final = (0.5, 1.5)  # seconds between attempts to take a busy slot
DEAD_LETTER_QUEUE: Final = 1000  # rows waiting to be stored before the pump waits
DEAD_LETTER_BATCH: Final = 500  # rows stored in one transaction
FINAL_STATUS_TIMEOUT: Final = 2.0
VALIDATION_CONNECTION: Final = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
    "application_name": "cdc-relay validation",
}

# Exceptions that end a session and are retried; anything else is a bug or a
# configuration error and ends the process.
SESSION_ERRORS: Final = (
    SessionFailed,
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
        self.limits = BrokerLimits.empty()
        self._stop = asyncio.Event()
        self._abort = asyncio.Event()

    def request_stop(self) -> None:
        """First call: stop cleanly. Second call: stop now, without waiting for confirms."""
        if self._stop.is_set():
            if not self._abort.is_set():
                log.warning("second stop request: exiting now; unconfirmed rows will be resent")
            self._abort.set()
        self._stop.set()

    async def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            session = Session(
                self.settings, self.metrics, self.router, self.limits, self._stop, self._abort
            )
            try:
                await session.run()
                return  # a session only returns normally when asked to stop
            except (ConfigError, FatalError):
                raise
            except (ProtocolError, AckTrackerError) as exc:
                # The same bytes would come again: retrying cannot help.
                raise FatalError(f"cannot process the replication stream: {exc}") from exc
            except SESSION_ERRORS as exc:
                rejected = _certificate_rejected(exc)
                if rejected is not None:
                    raise ConfigError(rejected) from None
                log.warning("session ended: %s", _describe(exc))
            finally:
                self.metrics.ready.set(0)
            if time.monotonic() - started > HEALTHY_SESSION_SECONDS or session.made_progress:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            self.metrics.reconnects.inc()
            log.info("reconnecting in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter, never below the minimum."""
        s = self.settings
        ceiling = min(s.reconnect_max, s.reconnect_min * (2 ** min(attempt, 30)))
        return max(s.reconnect_min, random.uniform(0, ceiling))


async def _declare_exchange(publisher: Publisher, name: str) -> None:
    """A declaration the broker refuses (permission, another type) is the operator's to fix."""
    try:
        await publisher.declare_exchange(name)
    except ExchangeError as exc:
        if exc.reply_code is None:  # the connection went away meanwhile: retry
            raise SessionFailed(str(exc)) from None
        hint = ""
        if exc.reply_code == ACCESS_REFUSED:
            hint = "; grant the RabbitMQ user configure permission on it, or run with --no-declare"
        raise ConfigError(f"{exc}{hint}") from None


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
    if isinstance(exc, SessionFailed | ReplicationError | PublishFailed):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).strip()}"


@dataclass(slots=True)
class _Connections:
    stream: ReplicationStream | None = None
    publisher: Publisher | None = None
    dead_letters: DeadLetterWriter | None = None


class Session:
    """One replication stream, one publisher, one dead-letter writer, and the core between them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        router: Router,
        limits: BrokerLimits,
        stop: asyncio.Event,
        abort: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.router = router
        self.limits = limits
        self.stop = stop
        self.abort = abort
        self.conns = _Connections()
        self.core: SessionCore | None = None
        self.failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status_wakeup = asyncio.Event()
        self.letters: deque[PendingDeadLetter] = deque()
        self.letters_waiting = asyncio.Event()
        self.letters_room = asyncio.Event()
        self.letters_room.set()
        self.letters_idle = asyncio.Event()
        self.letters_idle.set()
        self.closing = False

    @property
    def made_progress(self) -> bool:
        return self.core is not None and self.core.made_progress

    def fail(self, exc: BaseException) -> None:
        if not self.failure.done() and not self.closing:
            self.failure.set_exception(exc)

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.closing = True  # what our own closing causes is not a failure
            await _bounded(self._close(), "closing connections")
            if self.failure.done() and not self.failure.cancelled():
                self.failure.exception()  # retrieved: it was raised or superseded

    async def _run(self) -> None:
        s = self.settings
        stream = await ReplicationStream.connect(
            s.dsn,
            keepalive_idle=s.tcp_keepalive_idle,
            keepalive_interval=s.tcp_keepalive_interval,
            keepalive_count=s.tcp_keepalive_count,
        )
        self.conns.stream = stream
        wal_sender_timeout = parse_pg_duration(await stream.show("wal_sender_timeout"))
        if not await self._take_slot(stream):
            return  # asked to stop while standing by
        # The slot is ours now: its confirmed position cannot move under us.
        facts = await self._validate()
        self.core = core = SessionCore(
            outbox_relid=facts.outbox_relid,
            table=s.table,
            router=self.router,
            start_flush=facts.confirmed_flush_lsn,
            max_message_size=s.max_message_size,
            dead_letter_unroutable=s.on_unroutable == "deadletter",
            message_prefix=s.message_prefix,
            limits=self.limits,
            counters=self.metrics,
            observe_commit_to_confirm=self.metrics.commit_to_confirm.observe,
        )
        publisher = Publisher(
            s.amqp_urls,
            max_in_flight=s.max_in_flight,
            max_in_flight_bytes=s.max_in_flight_bytes,
            confirm_timeout=s.confirm_timeout,
            heartbeat=s.amqp_heartbeat,
            on_outcome=self._on_outcome,
        )
        self.conns.publisher = publisher
        await publisher.connect()
        if s.declare_exchange and s.message_format == "event":
            await _declare_exchange(publisher, s.exchange)
        self.conns.dead_letters = await DeadLetterWriter.connect(s.dsn, s.dead_letter_table)
        timeout = effective_pg_timeout(s.pg_timeout, wal_sender_timeout)
        log.info(
            "streaming from slot %s (publication %s, confirmed position %s) to %s",
            s.slot,
            s.publication,
            format_lsn(facts.confirmed_flush_lsn),
            publisher.connected_url,
        )
        if timeout > s.pg_timeout:
            log.info(
                "Postgres liveness timeout %.0fs (raised from --pg-timeout to outlast "
                "wal_sender_timeout %.0fs)",
                timeout,
                wal_sender_timeout,
            )
        self.metrics.ready.set(1)
        pump = asyncio.create_task(self._pump(stream, publisher, core), name="cdc-relay-pump")
        status = asyncio.create_task(
            self._status_loop(stream, core, timeout), name="cdc-relay-status"
        )
        helpers = [
            asyncio.create_task(self._store_dead_letters(), name="cdc-relay-dead-letters"),
            asyncio.create_task(self._stats_loop(core), name="cdc-relay-stats"),
        ]
        for task in (pump, status, *helpers):
            task.add_done_callback(self._task_done)
        stop_wait = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait(
                [pump, status, *helpers, stop_wait, self.failure],
                return_when=asyncio.FIRST_COMPLETED,
            )
            self._raise_failure()
            await self._stop_cleanly(pump, publisher, core)
            status.cancel()
            await asyncio.gather(status, return_exceptions=True)
            await asyncio.wait_for(self._send_status(stream, core), FINAL_STATUS_TIMEOUT)
            log.info("stopped; confirmed position %s", format_lsn(core.tracker.flush_lsn))
        finally:
            stop_wait.cancel()
            tasks = [pump, status, *helpers]
            for task in tasks:
                task.cancel()
            await _bounded(asyncio.gather(*tasks, stop_wait, return_exceptions=True), "tasks")
            # Report what was confirmed before whatever ended the session, so the
            # next one does not replay it (best effort: the link may be gone).
            if not self.stop.is_set() and core.status_due:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._send_status(stream, core), FINAL_STATUS_TIMEOUT)

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

    async def _take_slot(self, stream: ReplicationStream) -> bool:
        """START_REPLICATION; while another relay holds the slot, stand by on this connection."""
        s = self.settings
        standing_by = False
        while True:
            try:
                await stream.start(s.slot, s.publication, messages=True)
                if standing_by:
                    log.info("slot %s is free: taking over", s.slot)
                return True
            except SlotInUse as exc:
                if not standing_by:
                    log.info("standing by: %s", exc)
                standing_by = True
            except ReplicationError as exc:
                if exc.sqlstate in (SQLSTATE_UNDEFINED_OBJECT, SQLSTATE_PREREQUISITE_STATE):
                    raise ConfigError(
                        f"replication slot {s.slot} cannot be used: {exc}; "
                        "recreate it with `cdc-relay init` and reconcile the outbox"
                    ) from None
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), random.uniform(*STANDBY_RETRY))
            if self.stop.is_set():
                return False

    async def _validate(self) -> admin.StartupFacts:
        """Startup checks on a normal connection, bounded: a partition must not hang them."""
        dsn = self.settings.dsn

        def validate() -> admin.StartupFacts:
            # Bounded on its own (keepalives, tcp_user_timeout, statement_timeout), so
            # the thread ends soon after a timeout here, not whenever the network heals.
            with admin.connect(dsn, **VALIDATION_CONNECTION) as conn:
                conn.execute("SET statement_timeout = '20s'")
                return admin.validate(conn, self.settings)

        try:
            return await asyncio.wait_for(asyncio.to_thread(validate), VALIDATE_TIMEOUT)
        except TimeoutError:
            raise SessionFailed(
                f"startup checks got no answer in {VALIDATE_TIMEOUT:.0f}s"
            ) from None

    async def _stop_cleanly(
        self, pump: asyncio.Task[None], publisher: Publisher, core: SessionCore
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
            stored = drained and await until(self.letters_idle.wait())
            if not (drained and stored):
                log.warning(
                    "stopping with %d unconfirmed message(s); they will be sent again",
                    core.tracker.unconfirmed,
                )
        finally:
            abort.cancel()

    async def _close(self) -> None:
        conns = self.conns
        if conns.stream is not None:
            try:
                await conns.stream.close()
            except Exception as exc:
                log.debug("closing replication connection: %r", exc)
        if conns.publisher is not None:
            await conns.publisher.close()
        if conns.dead_letters is not None:
            try:
                await conns.dead_letters.close()
            except Exception as exc:
                log.debug("closing dead-letter connection: %r", exc)

    # -- the hot loop ------------------------------------------------------------

    async def _pump(
        self, stream: ReplicationStream, publisher: Publisher, core: SessionCore
    ) -> None:
        receive = core.receive
        publish = publisher.publish
        letters = self.letters
        while True:
            for frame in await stream.read_frames():
                action = receive(frame)
                if action is None:
                    continue
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
                letters.append(action)
                self.letters_idle.clear()
                self.letters_waiting.set()
                if len(letters) >= DEAD_LETTER_QUEUE:
                    self.letters_room.clear()
                    await self.letters_room.wait()
            if core.status_due:
                self.status_wakeup.set()

    # -- broker outcomes ----------------------------------------------------------

    def _on_outcome(self, outcome: Outcome) -> None:
        """One report from the publisher (called from its protocol: must not block)."""
        core = self.core
        assert core is not None
        try:
            letters = core.settle(outcome, time.time())
        except SessionFailed as exc:
            self.fail(exc)
            return
        if letters:
            self.letters.extend(letters)
            self.letters_idle.clear()
            self.letters_waiting.set()
        if core.status_due:
            self.status_wakeup.set()

    # -- dead letters -------------------------------------------------------------

    async def _store_dead_letters(self) -> None:
        """One writer, one connection, batches: a burst of bad rows is one round trip per 500."""
        writer = self.conns.dead_letters
        core = self.core
        assert writer is not None and core is not None
        letters = self.letters
        while True:
            await self.letters_waiting.wait()
            self.letters_waiting.clear()
            while letters:
                batch = [letters.popleft() for _ in range(min(len(letters), DEAD_LETTER_BATCH))]
                try:
                    await writer.write([p.letter for p in batch])
                except (psycopg.Error, OSError) as exc:
                    raise SessionFailed(f"dead-letter write failed: {_describe(exc)}") from None
                for pending in batch:
                    letter = pending.letter
                    log.warning(
                        "dead-lettered outbox row %s (LSN %s): %s",
                        letter.outbox_id,
                        format_lsn(letter.lsn),
                        letter.reason,
                    )
                core.stored([p.seq for p in batch], time.time())
                if len(letters) < DEAD_LETTER_QUEUE:
                    self.letters_room.set()
                if core.status_due:
                    self.status_wakeup.set()
            self.letters_idle.set()

    # -- status updates -----------------------------------------------------------

    async def _send_status(
        self, stream: ReplicationStream, core: SessionCore, reply: bool = False
    ) -> None:
        write, flush = core.status_positions()
        await stream.send_status(write, flush, flush, reply)
        core.status_sent(flush)
        self.metrics.flush_lsn.set(flush)
        self.metrics.received_lsn.set(core.received_lsn)

    async def _status_loop(
        self, stream: ReplicationStream, core: SessionCore, timeout: float
    ) -> None:
        """Perform what the schedule decides; the decisions are in pg/schedule.py."""
        schedule = StatusSchedule(self.settings.status_interval, timeout, time.monotonic())
        wakeup = self.status_wakeup
        while True:
            wait = schedule.wait_time(time.monotonic(), due=core.status_due)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), wait)
            wakeup.clear()
            now = time.monotonic()
            silent = now - stream.last_receive if stream.waiting_for_data else None
            decision = schedule.decide(now, due=core.status_due, silent=silent)
            if type(decision) is Dead:
                raise SessionFailed(
                    f"no data from Postgres for {decision.silent:.1f}s "
                    f"(liveness timeout {schedule.timeout:.0f}s)"
                )
            if type(decision) is Send:
                await self._send_status(stream, core, decision.reply_requested)
                schedule.sent(now)

    async def _stats_loop(self, core: SessionCore) -> None:
        interval = self.settings.stats_interval
        last = self.metrics.confirmed_count()
        last_t = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, count = time.monotonic(), self.metrics.confirmed_count()
            log.info("%.0f msg/s confirmed, %s", (count - last) / (now - last_t), core.describe())
            last, last_t = count, now


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_pg_duration(text: str, default_unit: str = "ms") -> float:
    """A time setting as SHOW prints it (``60s``, ``1min``, ``500ms``, ``0``) in seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"cannot read the time setting {text!r}")
    return float(match[1]) * _UNIT_SECONDS[match[2] or default_unit]


async def _bounded(awaitable: Awaitable[Any], what: str, timeout: float = 10.0) -> None:
    """Cleanup must never hang a relay that is trying to recover."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        log.error("%s took longer than %.0fs; abandoning it", what, timeout)

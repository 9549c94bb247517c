"""Wire the stream, the decoder, the router, the publisher and the ack tracker.

A session is one replication connection plus one AMQP connection. Any failure
ends the session: both connections close, and the next session starts again
from the slot's confirmed position after a backoff with jitter. Nothing is
retried inside a session, so there is exactly one recovery path to test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from cdc_relay.acks import AckTracker, AckTrackerError
from cdc_relay.amqp import ExchangeError, Outcome, Publisher, PublishFailed
from cdc_relay.config import ConfigError, FatalError, Settings
from cdc_relay.latency import CommitClock
from cdc_relay.lsn import format_lsn
from cdc_relay.metrics import Metrics
from cdc_relay.pg import admin
from cdc_relay.pg.pgoutput import (
    Begin,
    Commit,
    Insert,
    PrimaryKeepalive,
    ProtocolError,
    Relation,
    decode_copy_data,
    decode_message,
)
from cdc_relay.pg.replication import (
    SQLSTATE_PREREQUISITE_STATE,
    SQLSTATE_UNDEFINED_OBJECT,
    ReplicationError,
    ReplicationStream,
    SlotInUse,
)
from cdc_relay.router import (
    OutboxRow,
    OutboxSchemaError,
    Router,
    RowReader,
    UnmappableRow,
)

log = logging.getLogger("cdc_relay")

STATUS_MIN_GAP = 0.02  # seconds between two status updates: no storms, ever
HEALTHY_SESSION_SECONDS = 30.0
VALIDATE_TIMEOUT = 30.0  # a session this long resets the backoff


class SessionFailed(Exception):
    """Something ended the session; the next one replays from the slot."""


@dataclass(slots=True)
class _DeadLetter:
    seq: int
    row: dict[str, Any]
    outbox_id: str | None
    reason: str
    lsn: int


class Relay:
    """Runs sessions until asked to stop; raises ConfigError for what retrying cannot fix."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.router = Router(settings.exchange, settings.routing_key, settings.message_format)
        self._stop = asyncio.Event()
        self._schema, self._table = settings.table_parts
        self._made_progress = False

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        attempt = 0
        standing_by = False
        while not self._stop.is_set():
            started = time.monotonic()
            self._made_progress = False
            try:
                await self._session()
                return  # a session only returns normally when asked to stop
            except ConfigError:
                raise
            except (ProtocolError, AckTrackerError) as exc:
                # The same bytes would come again: retrying cannot help.
                raise FatalError(f"cannot process the replication stream: {exc}") from exc
            except SlotInUse as exc:
                # Hot standby: poll the slot often so takeover is quick, log once.
                (log.debug if standing_by else log.info)("standing by: %s", exc)
                standing_by = True
                attempt = 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), random.uniform(0.5, 1.5))
                continue
            except (SessionFailed, ReplicationError, PublishFailed) as exc:
                log.warning("session ended: %s", exc)
            except (OSError, psycopg.Error, ConnectionError, TimeoutError) as exc:
                log.warning("session ended: %s: %s", type(exc).__name__, exc)
            except Exception as exc:  # aiormq/aio-pika raise their own hierarchy
                if type(exc).__module__.split(".")[0] not in ("aiormq", "aio_pika", "pamqp"):
                    raise
                log.warning("session ended: %s: %s", type(exc).__name__, exc)
            finally:
                self.metrics.ready.set(0)
            if time.monotonic() - started > HEALTHY_SESSION_SECONDS or self._made_progress:
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
        ceiling = min(s.reconnect_max, s.reconnect_min * (2**attempt))
        return max(s.reconnect_min, random.uniform(0, ceiling))

    # -- one session ----------------------------------------------------------

    def _validate_sync(self) -> str | None:
        """Startup checks; returns the slot's confirmed position (where we resume)."""
        try:
            conn = psycopg.connect(self.settings.dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise SessionFailed(f"cannot connect to Postgres: {str(exc).strip()}") from None
        with conn:
            admin.validate(conn, self.settings)
            info = admin.slot_info(conn, self.settings.slot)
        return info.confirmed_flush_lsn if info else None

    async def _session(self) -> None:
        # A partitioned network can hang a plain query forever: bound it.
        try:
            start = await asyncio.wait_for(asyncio.to_thread(self._validate_sync), VALIDATE_TIMEOUT)
        except TimeoutError:
            raise SessionFailed(f"startup checks got no answer in {VALIDATE_TIMEOUT}s") from None
        session = _Session(self)
        session.start_position = start
        try:
            await session.run()
        finally:
            await _bounded(session.close(), "closing connections")


class _Session:
    """One replication connection and one AMQP connection, alive together."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.settings = relay.settings
        self.metrics = relay.metrics
        self.router = relay.router
        self.tracker = AckTracker()
        self.commit_clock = CommitClock()
        self.txn_first_seq = 0
        self.stream: ReplicationStream | None = None
        self.publisher: Publisher | None = None
        self.dl_conn: psycopg.AsyncConnection[Any] | None = None
        self.failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status_wakeup = asyncio.Event()
        self.received_lsn = 0
        self.sent_flush = 0
        self.rows: dict[int, OutboxRow] = {}
        self.txn_lsn = 0
        self.stop_at_commit = False
        self.closing = False
        self.start_position: str | None = None
        self.background: set[asyncio.Task[Any]] = set()

    def fail(self, exc: BaseException) -> None:
        if not self.failure.done() and not self.closing:
            self.failure.set_exception(exc)

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        self.publisher = Publisher(
            s.amqp_urls,
            max_in_flight=s.max_in_flight,
            confirm_timeout=s.confirm_timeout,
            heartbeat=s.amqp_heartbeat,
            on_outcome=self.on_outcome,
        )
        await self.publisher.connect()
        if s.declare_exchange and s.message_format == "event":
            try:
                await self.publisher.declare_exchange(s.exchange)
            except ExchangeError as exc:  # another type, or no permission: retrying cannot help
                raise ConfigError(str(exc)) from None
        self.stream = await ReplicationStream.connect(
            s.dsn,
            keepalive_idle=s.tcp_keepalive_idle,
            keepalive_interval=s.tcp_keepalive_interval,
            keepalive_count=s.tcp_keepalive_count,
        )
        try:
            await self.stream.start(s.slot, s.publication)
        except ReplicationError as exc:
            if exc.sqlstate in (SQLSTATE_UNDEFINED_OBJECT, SQLSTATE_PREREQUISITE_STATE):
                raise ConfigError(
                    f"replication slot {s.slot} cannot be used: {exc}; "
                    "recreate it with `cdc-relay init` and reconcile the outbox"
                ) from None
            raise
        log.info(
            "streaming from slot %s (publication %s, confirmed position %s) to %s",
            s.slot,
            s.publication,
            self.start_position,
            self.publisher.connected_url,
        )
        self.metrics.ready.set(1)
        tasks = [
            asyncio.create_task(self.pump(), name="cdc-relay-pump"),
            asyncio.create_task(self.status_loop(), name="cdc-relay-status"),
            asyncio.create_task(self.stats_loop(), name="cdc-relay-stats"),
        ]
        stop_wait = asyncio.create_task(self.relay._stop.wait())
        try:
            done, _ = await asyncio.wait(
                [*tasks, stop_wait, self.failure], return_when=asyncio.FIRST_COMPLETED
            )
            if self.failure.done():
                self.failure.result()  # raises the failure
            for task in tasks:
                if task in done:
                    task.result()  # raises what ended the pump
            # Asked to stop: finish the transaction being read (so that nothing
            # is replayed after a clean stop), stop reading, drain confirms
            # (bounded), send the final flush.
            pump = tasks[0]
            if self.tracker.in_transaction:
                self.stop_at_commit = True
                await asyncio.wait([pump, self.failure], timeout=s.shutdown_timeout)
                if self.failure.done():
                    self.failure.result()
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            drained = await self.publisher.wait_confirmed(s.shutdown_timeout)
            if self.failure.done():
                self.failure.exception()
            if not drained:
                log.warning(
                    "stopping with %d unconfirmed message(s); they will be sent again",
                    self.publisher.in_flight,
                )
            await self.send_status()
            log.info("stopped; confirmed position %s", format_lsn(self.tracker.flush_lsn))
        finally:
            stop_wait.cancel()
            for task in tasks:
                task.cancel()
            await _bounded(asyncio.gather(*tasks, stop_wait, return_exceptions=True), "tasks")
            # Report what was confirmed before whatever ended the session, so the
            # next one does not replay it (best effort: the link may be gone).
            if self.tracker.flush_lsn > self.sent_flush:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.send_status(), 2)
            if self.failure.done() and not self.failure.cancelled():
                self.failure.exception()  # mark retrieved

    def _on_amqp_closed(self, error: PublishFailed) -> None:
        self.fail(SessionFailed(str(error)))

    async def close(self) -> None:
        self.closing = True  # what our own closing causes is not a failure
        for task in list(self.background):
            task.cancel()
        if self.stream is not None:
            try:
                await self.stream.close()
            except Exception as exc:
                log.debug("closing replication connection: %r", exc)
        if self.publisher is not None:
            await self.publisher.close()
        if self.dl_conn is not None:
            try:
                await self.dl_conn.close()
            except Exception as exc:
                log.debug("closing dead-letter connection: %r", exc)

    # -- the hot loop ------------------------------------------------------------

    async def pump(self) -> None:
        stream = self.stream
        publisher = self.publisher
        assert stream is not None and publisher is not None
        tracker = self.tracker
        router = self.router
        metrics = self.metrics
        readers: dict[int, RowReader | None] = {}
        rows = self.rows
        schema, table = self.relay._schema, self.relay._table
        max_size = self.settings.max_message_size
        while True:
            frames = await stream.read_frames()
            for raw in frames:
                message = decode_copy_data(raw)
                if type(message) is PrimaryKeepalive:
                    if message.wal_end > self.received_lsn:
                        self.received_lsn = message.wal_end
                    tracker.keepalive(message.wal_end)
                    if message.reply_requested or tracker.flush_lsn > self.sent_flush:
                        self.status_wakeup.set()
                    continue
                if message.wal_end > self.received_lsn:
                    self.received_lsn = message.wal_end
                event = decode_message(message.payload)
                kind = type(event)
                if kind is Insert:
                    reader = readers.get(event.relid)
                    if reader is None:
                        if event.relid not in readers:
                            raise SessionFailed(f"Insert for unknown relation {event.relid}")
                        continue  # a table other than the outbox: not ours
                    seq = tracker.add_message()
                    try:
                        row = reader.read(event.new)
                        envelope = router.route(row)
                        if len(envelope.body) > max_size:
                            raise UnmappableRow(
                                f"message body of {len(envelope.body)} bytes exceeds "
                                f"--max-message-size {max_size}"
                            )
                    except UnmappableRow as exc:
                        await self.dead_letter_now(seq, event.new, reader, str(exc))
                        continue
                    rows[seq] = row
                    await publisher.publish(seq, envelope)
                    metrics.published.inc()
                elif kind is Begin:
                    tracker.begin()
                    self.txn_lsn = event.final_lsn
                    self.txn_first_seq = tracker.last_seq + 1
                elif kind is Commit:
                    tracker.commit(event.end_lsn)
                    metrics.transactions.inc()
                    if tracker.last_seq >= self.txn_first_seq:
                        self.commit_clock.committed(tracker.last_seq, event.commit_ts)
                        self._transactions_confirmed()
                    if tracker.flush_lsn > self.sent_flush:
                        self.status_wakeup.set()
                    if self.stop_at_commit:
                        return
                elif kind is Relation:
                    if event.namespace == schema and event.name == table:
                        try:
                            readers[event.relid] = RowReader([c.name for c in event.columns])
                        except OutboxSchemaError as exc:
                            raise ConfigError(f"{schema}.{table}: {exc}") from None
                    else:
                        readers[event.relid] = None
                # Origin, Type, Message and (misconfigured) Update/Delete/Truncate
                # carry nothing to publish; validation keeps them out.

    # -- broker outcomes ----------------------------------------------------------

    def on_outcome(self, outcome: Outcome) -> None:
        """What one broker event settled (the publisher's one callback)."""
        if outcome.confirmed:
            self.on_confirm(outcome.confirmed)
        for seq, error in outcome.failed:
            self.on_failure(seq, error)
        if outcome.lost is not None:
            self._on_amqp_closed(outcome.lost)

    def on_confirm(self, seqs: list[int]) -> None:
        """The messages one ack frame confirmed (increasing sequence numbers)."""
        rows = self.rows
        for seq in seqs:
            rows.pop(seq, None)
        tracker = self.tracker
        before = tracker.flush_lsn
        tracker.confirm_many(seqs)
        self.metrics.confirmed.inc(len(seqs))
        if tracker.flush_lsn != before:
            self.status_wakeup.set()
            self.relay._made_progress = True
            self._transactions_confirmed()

    def _transactions_confirmed(self) -> None:
        """Observe commit-to-confirm for every transaction that just became confirmed.

        Called once per ack frame (not per message) that moved the flush
        position, and after a Commit or a dead-letter write: one clock read for
        all the transactions one ``multiple`` ack finished.
        """
        clock = self.commit_clock
        if clock.has_confirmed(self.tracker.confirmed_upto):
            observe = self.metrics.commit_to_confirm.observe
            for seconds in clock.confirmed(self.tracker.confirmed_upto, time.time()):
                observe(seconds)

    def on_failure(self, seq: int, error: PublishFailed) -> None:
        row = self.rows.pop(seq, None)
        self.metrics.publish_failures.inc()
        if error.returned and self.settings.on_unroutable == "deadletter" and row is not None:
            task = asyncio.create_task(
                self.dead_letter(
                    _DeadLetter(seq, row.as_dict(), row.id, error.reason, self.txn_lsn)
                )
            )
            self.background.add(task)
            task.add_done_callback(self._background_done)
            return
        message = row.id if row is not None else f"#{seq}"
        self.fail(SessionFailed(f"publish of message {message} failed: {error}"))

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.fail(SessionFailed(f"dead-letter write failed: {task.exception()!r}"))

    # -- dead letters -------------------------------------------------------------

    async def dead_letter_now(
        self, seq: int, values: tuple[Any, ...], reader: RowReader, reason: str
    ) -> None:
        try:
            row = reader.read(values)
            data, outbox_id = row.as_dict(), row.id
        except UnmappableRow:
            data = {"values": [_jsonable(v) for v in values]}
            outbox_id = None
        await self.dead_letter(_DeadLetter(seq, data, outbox_id, reason, self.txn_lsn))

    async def dead_letter(self, item: _DeadLetter) -> None:
        """Store a row that can never be published; only then may the slot pass it."""
        if self.dl_conn is None or self.dl_conn.closed:
            self.dl_conn = await psycopg.AsyncConnection.connect(
                self.settings.dsn, autocommit=True, connect_timeout=10
            )
        schema, table = self.settings.dead_letter_table
        await self.dl_conn.execute(
            sql.SQL(
                "INSERT INTO {} (outbox_id, reason, row_data, lsn)"
                " VALUES (%s, %s, %s::jsonb, %s::pg_lsn)"
            ).format(admin.qualified(schema, table)),
            (
                item.outbox_id or "00000000-0000-0000-0000-000000000000",
                item.reason,
                orjson.dumps(item.row).decode(),
                format_lsn(item.lsn),
            ),
        )
        log.warning("dead-lettered outbox row %s: %s", item.outbox_id, item.reason)
        self.metrics.dead_lettered.inc()
        before = self.tracker.flush_lsn
        self.tracker.confirm(item.seq)
        if self.tracker.flush_lsn != before:
            self.status_wakeup.set()
            self._transactions_confirmed()

    # -- status updates -----------------------------------------------------------

    async def send_status(self, reply_requested: bool = False) -> None:
        stream = self.stream
        assert stream is not None
        flush = self.tracker.flush_lsn
        write = max(self.received_lsn, flush)
        await stream.send_status(write, flush, flush, reply_requested)
        self.sent_flush = flush
        self.metrics.flush_lsn.set(flush)
        self.metrics.received_lsn.set(self.received_lsn)

    async def status_loop(self) -> None:
        """Timer-driven status, woken early when flush moves or the server asks."""
        interval = min(self.settings.status_interval, self.settings.pg_timeout / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.status_wakeup.wait(), interval)
            self.status_wakeup.clear()
            reply_requested = False
            stream = self.stream
            if stream is not None and stream.waiting_for_data:
                # A silent partition keeps TCP up (or TCP keepalives may be
                # answered by a middlebox): ask the server for a reply, and give
                # up on the connection if none comes in time.
                silent = time.monotonic() - stream.last_receive
                if silent > self.settings.pg_timeout:
                    self.fail(
                        SessionFailed(f"no data from Postgres for {silent:.1f}s (--pg-timeout)")
                    )
                    return
                reply_requested = silent > self.settings.pg_timeout / 3
            await self.send_status(reply_requested)
            await asyncio.sleep(STATUS_MIN_GAP)

    async def stats_loop(self) -> None:
        interval = self.settings.stats_interval
        last = self.metrics.confirmed_count()
        last_t = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, count = time.monotonic(), self.metrics.confirmed_count()
            log.info(
                "%.0f msg/s confirmed, %d in flight, confirmed LSN %s",
                (count - last) / (now - last_t),
                self.tracker.unconfirmed,
                format_lsn(self.tracker.flush_lsn),
            )
            last, last_t = count, now


async def _bounded(awaitable: Any, what: str, timeout: float = 10.0) -> None:
    """Cleanup must never hang a relay that is trying to recover."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        log.error("%s took longer than %.0fs; abandoning it", what, timeout)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None:
        return None
    return repr(value)

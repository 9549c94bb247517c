"""The session core: replication frames and broker outcomes in, actions out.

The rule of this module (as h11's ``_state.py`` says of its own): everything
that decides what happens to an outbox row, a transaction and the flush
position lives here, and nothing here awaits, sleeps, reads a clock or touches
a socket. The session loop in ``session.py`` feeds it frames and outcomes and
performs what it answers:

- ``receive(frame)`` answers ``None`` (nothing to do), an ``Envelope`` to
  publish under sequence number ``last_seq``, a ``PendingDeadLetter`` to store,
  or ``STOP`` (a clean stop reached a transaction boundary); ``receive_many(frames,
  start)`` runs it over a batch up to the next action, which it answers with the
  index of the frame after it;
- ``settle(outcome, now)`` takes one ack/nack/return report from the publisher
  and answers the dead letters it makes necessary (or raises ``SessionFailed``);
- ``stored(seqs, now)`` marks dead letters durable, so the flush may pass them;
- after it raised ``SessionFailed`` the core is in an error state: it reads,
  routes and publishes nothing more (``failure`` says why), but still takes
  the acks and stored dead letters of what was sent before;
- ``status_due`` is the one place that says "a standby status update should
  go out now"; ``status_sent()`` records that it went.

The flush position has one owner, the ``AckTracker`` held here, seeded with
the slot's confirmed position so that a session never reports less. Two rules
it consults are pure modules of their own: ``limits`` (what the broker refused,
and when to ask again) and ``emitauth`` (whether the emit function wrote a
message, and the row it carries).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cdc_relay import reasons
from cdc_relay.acks import AckTracker
from cdc_relay.amqp.window import Outcome
from cdc_relay.emitauth import EMIT_AUTH_FAILED, authenticated, row_from_message
from cdc_relay.envelope import Envelope
from cdc_relay.errors import SessionError
from cdc_relay.letters import DeadLetter, PendingDeadLetter
from cdc_relay.limits import BrokerLimits, Recheck
from cdc_relay.lsn import format_lsn
from cdc_relay.pg.pgoutput import (
    BEGIN_TAG,
    COMMIT_TAG,
    Insert,
    LogicalMessage,
    ProtocolError,
    Relation,
    begin_fields_at,
    commit_fields_at,
    decode_message_at,
)
from cdc_relay.pg.walproto import (
    PG_EPOCH_UNIX,
    XLOG_PAYLOAD_AT,
    PrimaryKeepalive,
    decode_copy_data,
    xlog_wal_end,
)
from cdc_relay.router import Router
from cdc_relay.rows import MissingColumns, OutboxRow, OutboxSchemaError, RowReader, UnmappableRow


class SessionFailed(SessionError):
    """Something ended the session; the next one replays from the slot.

    ``code`` is the broker failure's reason code (``reasons``) when one ended
    it, for the ``reason`` field of the log line that says so.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class PublishRefused(SessionFailed):
    """The broker nacked (or returned, under ``--on-unroutable fail``) a message.

    The channel lives on: the acks of the messages published before it can
    still arrive and be reported before the session ends.
    """


class _Stop:
    """Sentinel answer: a stop was requested and the stream is at a transaction boundary."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


STOP: Final = _Stop()


Action = Envelope | PendingDeadLetter | Recheck | _Stop | None


@dataclass(frozen=True, slots=True)
class Outbox:
    """One outbox table of the slot: its OID, name, router and per-table counters.

    Several outboxes share one slot (``--config``): the core finds a row's
    outbox with one dict lookup by relation OID, as it did for one outbox.
    ``counters`` has ``published``, ``confirmed`` and ``dead_lettered``
    (``metrics.TableCounters``), or is None; its router's layout reads its columns.
    """

    relid: int
    table: str
    router: Router
    counters: Any = None


class SessionCore:
    """One session's protocol state: transactions, in-flight rows, the flush position."""

    def __init__(
        self,
        *,
        outbox_relid: int = 0,
        table: str = "",
        router: Router | None = None,
        start_flush: int,
        outboxes: Sequence[Outbox] = (),
        max_message_size: int,
        dead_letter_unroutable: bool = True,
        message_prefix: str = "cdc_relay",
        emit_key: bytes | None = None,
        limits: BrokerLimits | None = None,
        counters: Any = None,
        observe_commit_to_confirm: Callable[[float], None] | None = None,
    ) -> None:
        if not outboxes:
            assert router is not None, "one outbox (outbox_relid, table, router) or outboxes"
            table_counters = counters.table(table) if counters is not None else None
            outboxes = (Outbox(outbox_relid, table, router, table_counters),)
        # The first outbox also takes what belongs to no table: emitted messages and
        # inserts into relations that are not an outbox (their dead letters).
        self.primary = primary = outboxes[0]
        self.outboxes = {o.relid: o for o in outboxes}
        self._single = len(outboxes) == 1
        self.outbox_relid = primary.relid
        self.table = primary.table
        self.router = primary.router
        self.tracker = AckTracker(start_flush)
        self.limits = limits or BrokerLimits.empty()
        self.max_message_size = max_message_size
        self.dead_letter_unroutable = dead_letter_unroutable
        self.message_prefix = message_prefix
        self.emit_key = emit_key
        self._counters = counters
        self._observe = observe_commit_to_confirm
        # relid -> (reader, its outbox) for an outbox (MissingColumns while it lacked
        # required columns); None for any other relation the stream describes.
        self._readers: dict[int, tuple[RowReader | MissingColumns, Outbox] | None] = {}
        self._relation_names: dict[int, str] = {}
        # Column names of every other relation: its rows' dead letters keep them, so a
        # recreated outbox's rows (a new OID until the next session) can be replayed.
        self._other_columns: dict[int, tuple[str, ...]] = {}
        # The row of every message published and not yet settled: a returned message is
        # dead-lettered from it. With several outboxes, also its outbox (none kept for
        # one: a tuple per row measurably cost the one-table hot path).
        self._rows: dict[int, Any] = {}
        self._row_outboxes: dict[int, Outbox] = {}
        # The reason code and outbox of every dead letter made and not yet stored
        # (counted once stored).
        self._letter_codes: dict[int, tuple[str, Outbox]] = {}
        # The outbox of each row waiting for a broker re-check (rare: a remembered refusal).
        self._rechecks: dict[int, Outbox] = {}
        # The open transaction: its first sequence number and commit LSN (Begin.final_lsn).
        self._txn_first_seq = 1
        self._txn_lsn = 0
        # Committed transactions with messages not all confirmed yet, oldest first:
        # (last seq, first seq, commit LSN, commit time as Unix seconds).
        self._txns: deque[tuple[int, int, int, float]] = deque()
        self.received_lsn = start_flush
        self.sent_flush = start_flush
        self._reply_requested = False
        self.stop_requested = False
        self._failure: SessionFailed | None = None
        self.made_progress = False
        # Commit time (Unix seconds) of the newest transaction whose messages are all
        # confirmed: where `resync` without --since starts (state.py).
        self.confirmed_commit_time: float | None = None

    # -- the stream ---------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The sequence number of the envelope ``receive`` answered last."""
        return self.tracker.last_seq

    @property
    def in_transaction(self) -> bool:
        return self.tracker.in_transaction

    @property
    def flush_lsn(self) -> int:
        """The position every message up to which is confirmed or stored (safe to report)."""
        return self.tracker.flush_lsn

    @property
    def unconfirmed(self) -> int:
        """Messages published (or dead-lettered) and not yet confirmed (or stored)."""
        return self.tracker.unconfirmed

    def request_stop(self) -> None:
        """Stop at the next transaction boundary: ``receive`` answers ``STOP`` at its Commit."""
        self.stop_requested = True

    # -- the error state ---------------------------------------------------------------

    @property
    def failure(self) -> SessionFailed | None:
        """What ended the session, once the core raised it; it then answers no new input."""
        return self._failure

    def _fail(self, exc: SessionFailed) -> SessionFailed:
        """Enter the error state (like h11's ERROR): nothing new is read, routed or published.

        ``receive``, ``receive_many``, ``rechecked`` and ``unpublishable`` raise from
        now on (shadowed on the instance, so the hot path pays nothing for the check).
        ``settle`` and ``stored`` still take reports of what already happened: after a
        nack the acks of the messages published before it, and dead letters stored
        while the session winds down, move the flush that the final status update
        reports.
        """
        if self._failure is None:
            self._failure = exc
            for name in ("receive", "receive_many", "rechecked", "unpublishable"):
                setattr(self, name, self._refuse)
        return exc

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise SessionFailed(f"the session failed already: {self._failure}")

    def receive(self, frame: bytes) -> Action:
        """One CopyData frame of the replication stream."""
        return self.receive_many((frame,))[1]

    def receive_many(self, frames: Sequence[bytes], start: int = 0) -> tuple[int, Action]:
        """``receive`` for each of ``frames[start:]`` in turn, until one answers an action.

        Returns the index after that frame and its action, or ``(len(frames), None)``:
        the session's loop over one read of the stream, without a call (and a trip
        through its loop) per Begin, Commit or keepalive. Each frame is decoded
        exactly when ``receive`` would decode it.
        """
        tracker = self.tracker
        end = len(frames)
        i = start
        while i < end:
            frame = frames[i]
            i += 1
            if type(frame) is not bytes:
                frame = bytes(frame)
            wal_end = xlog_wal_end(frame)
            if wal_end < 0:  # a keepalive (or a frame decode_copy_data refuses)
                self._other_frame(frame)
                continue
            if wal_end > self.received_lsn:
                self.received_lsn = wal_end
            # Begin and Commit are read as fields, not objects (one of each per transaction);
            # the rest by `type(x) is` (one identity test per message, measured cheaper than
            # an isinstance chain on this hot path), which narrows nothing for mypy: hence
            # the ignores.
            tag = frame[XLOG_PAYLOAD_AT]
            if tag == BEGIN_TAG:
                tracker.begin()
                self._txn_first_seq = tracker.last_seq + 1
                self._txn_lsn = begin_fields_at(frame, XLOG_PAYLOAD_AT)[0]
                continue
            if tag == COMMIT_TAG:
                _, _, end_lsn, commit_ts = commit_fields_at(frame, XLOG_PAYLOAD_AT)
                if self._commit(end_lsn, commit_ts) is STOP:
                    return i, STOP
                continue
            event = decode_message_at(frame, XLOG_PAYLOAD_AT)
            kind = type(event)
            if kind is Insert:
                return i, self._insert(event)  # type: ignore[arg-type]
            if kind is Relation:
                self._relation(event)  # type: ignore[arg-type]
            elif kind is LogicalMessage and event.prefix == self.message_prefix:  # type: ignore[union-attr]
                return i, self._message(event)  # type: ignore[arg-type]
            # Origin, Type, other prefixes' messages and (misconfigured) Update/Delete/Truncate
            # carry nothing to publish; startup validation keeps the publication to inserts.
        return end, None

    def _other_frame(self, frame: bytes) -> None:
        """A primary keepalive; any other frame here is malformed, and decoding it raises."""
        message = decode_copy_data(frame)
        if type(message) is not PrimaryKeepalive:  # XLogData, its payload empty
            raise ProtocolError("empty pgoutput message")
        if message.wal_end > self.received_lsn:
            self.received_lsn = message.wal_end
        self.tracker.keepalive(message.wal_end)
        if message.reply_requested:
            self._reply_requested = True

    def _relation(self, event: Relation) -> None:
        """The outbox is known by OID: a renamed or moved outbox is still the outbox."""
        self._relation_names[event.relid] = f"{event.namespace or 'pg_catalog'}.{event.name}"
        outbox = self.outboxes.get(event.relid)
        if outbox is None:
            self._readers[event.relid] = None
            self._other_columns[event.relid] = tuple(c.name for c in event.columns)
            return
        try:
            self._readers[event.relid] = (
                RowReader(
                    [c.name for c in event.columns],
                    outbox.router.layout,
                    [c.type_oid for c in event.columns],
                ),
                outbox,
            )
        except OutboxSchemaError as exc:
            missing = MissingColumns(
                tuple(c.name for c in event.columns),
                f"{exc} when this row was written (DDL while streaming); row_data holds "
                "the columns it had and their values",
            )
            self._readers[event.relid] = (missing, outbox)

    def _insert(self, event: Insert) -> Envelope | PendingDeadLetter | Recheck:
        seq = self.tracker.add_message()
        entry = self._readers.get(event.relid)
        if entry is None:
            if event.relid not in self._readers:
                raise self._fail(
                    SessionFailed(f"Insert for relation {event.relid} before its Relation message")
                )
            name = self._relation_names.get(event.relid, str(event.relid))
            columns = self._other_columns.get(event.relid)
            return self._dead(
                seq,
                event.new,
                _read_if_outbox(columns or (), event.new, self.primary.router),
                f"insert into {name} (OID {event.relid}), which is not {self._outbox_names()}",
                columns,
                code=reasons.NOT_OUTBOX,
            )
        reader, outbox = entry
        try:
            row = reader.read(event.new)
        except Exception as exc:
            return self._dead(seq, event.new, None, _reason(exc), reader.columns, outbox=outbox)
        return self._route(seq, event.new, row, outbox)

    def _outbox_names(self) -> str:
        outboxes = list(self.outboxes.values())
        if len(outboxes) == 1:
            return (
                f"the outbox {self.table} (OID {self.outbox_relid}): the publication must "
                "cover only the outbox"
            )
        names = ", ".join(f"{o.table} (OID {o.relid})" for o in outboxes)
        return f"one of the outboxes {names}: the publication must cover only them"

    def _route(
        self, seq: int, values: tuple[Any, ...], row: OutboxRow, outbox: Outbox
    ) -> Envelope | PendingDeadLetter | Recheck:
        code = reasons.TOO_LARGE
        try:
            envelope = outbox.router.route(row)
            reason = self._refusal(envelope)
        except Exception as exc:
            reason, code = _reason(exc), reasons.BAD_ROW
        if reason is not None:
            return self._dead(seq, values, row, reason, code=code, outbox=outbox)
        limits = self.limits
        if limits.refuses() and limits.refusal(envelope.exchange, len(envelope.body)):
            self._rechecks[seq] = outbox
            return Recheck(seq, envelope, values, row)
        return self._publishing(seq, row, envelope, outbox)

    def rechecked(self, recheck: Recheck) -> Envelope | PendingDeadLetter:
        """After the broker was asked again: publish, or dead-letter if it still refuses."""
        envelope = recheck.envelope
        outbox = self._rechecks.pop(recheck.seq, self.primary)
        why = self.limits.refusal(envelope.exchange, len(envelope.body))
        if why is not None:
            # limits.refusal names the refused exchange first, then the size.
            code = (
                reasons.EXCHANGE_REFUSED
                if envelope.exchange in self.limits.refused_exchanges
                else reasons.TOO_LARGE
            )
            return self._dead(
                recheck.seq, recheck.values, recheck.row, why, code=code, outbox=outbox
            )
        return self._publishing(recheck.seq, recheck.row, envelope, outbox)

    def _publishing(self, seq: int, row: OutboxRow, envelope: Envelope, outbox: Outbox) -> Envelope:
        self._rows[seq] = row
        if not self._single:
            self._row_outboxes[seq] = outbox
        counters = outbox.counters
        if counters is not None:
            counters.published.inc()
        return envelope

    def _message(self, event: LogicalMessage) -> Envelope | PendingDeadLetter | Recheck:
        """``outbox_emit``: a transactional message is a row without a table.

        A non-transactional one would be published whether or not its
        transaction commits, so it is refused; it gets a transaction of its own
        (at its LSN) so that its dead letter holds the flush like any row.
        """
        tracker = self.tracker
        if not event.transactional:
            own = not tracker.in_transaction
            if own:
                tracker.begin()
                self._txn_first_seq, self._txn_lsn = tracker.last_seq + 1, event.lsn
            seq = tracker.add_message()
            if own:
                tracker.commit(event.lsn)
            return self._dead(
                seq,
                (event.content,),
                None,
                f"non-transactional logical message with prefix {event.prefix!r}: it would "
                "bypass the commit (use pg_logical_emit_message(true, ...), i.e. outbox_emit)",
                code=reasons.NON_TRANSACTIONAL,
            )
        seq = tracker.add_message()
        body = authenticated(event.content, self.emit_key)
        if body is None:
            return self._dead(
                seq, (event.content,), None, EMIT_AUTH_FAILED, code=reasons.UNAUTHENTICATED
            )
        try:
            row = row_from_message(body)
        except Exception as exc:
            return self._dead(seq, (event.content,), None, _reason(exc))
        return self._route(seq, (event.content,), row, self.primary)

    def _refusal(self, envelope: Envelope) -> str | None:
        """Why this envelope can never be published: over --max-message-size."""
        size = len(envelope.body)
        if size > self.max_message_size:
            return (
                f"message body of {size} bytes exceeds the maximum message size "
                f"{self.max_message_size} (--max-message-size)"
            )
        return None

    def _commit(self, end_lsn: int, commit_ts: int) -> _Stop | None:
        tracker = self.tracker
        tracker.commit(end_lsn)
        if self._counters is not None:
            self._counters.transactions.inc()
        last = tracker.last_seq
        if last >= self._txn_first_seq:
            commit_unix = commit_ts / 1_000_000 + PG_EPOCH_UNIX
            self._txns.append((last, self._txn_first_seq, self._txn_lsn, commit_unix))
        return STOP if self.stop_requested else None

    # -- broker outcomes ------------------------------------------------------------

    def settle(self, outcome: Outcome, now: float) -> list[PendingDeadLetter]:
        """One report from the publisher; returned rows become dead letters.

        Raises ``SessionFailed`` for everything else the broker refused (a nack,
        a lost channel or connection): only a replay from the slot is safe then.
        """
        rows = self._rows
        confirmed = outcome.confirmed
        if confirmed:
            if self._single:  # one outbox: one count, as before there were several
                for seq in confirmed:
                    del rows[seq]
                if self.primary.counters is not None:
                    self.primary.counters.confirmed.inc(len(confirmed))
            else:
                outboxes = self._row_outboxes
                for seq in confirmed:
                    del rows[seq]
                    counters = outboxes.pop(seq).counters
                    if counters is not None:
                        counters.confirmed.value += 1
            self._confirm(confirmed, now)
        letters: list[PendingDeadLetter] = []
        for seq, error in outcome.failed:
            row = rows.pop(seq, None)
            outbox = self._row_outboxes.pop(seq, self.primary)
            if self._counters is not None:
                self._counters.publish_failures.inc(error.code)
            if error.returned and self.dead_letter_unroutable and row is not None:
                letters.append(
                    self._dead(seq, None, row, error.reason, code=reasons.UNROUTABLE, outbox=outbox)
                )
                continue
            raise self._fail(
                PublishRefused(f"publish of message {seq} failed: {error}", code=error.code)
            )
        lost = outcome.lost
        if lost is not None:
            if rows and self._counters is not None:  # every unsettled publish is lost with it
                self._counters.publish_failures.inc(lost.code, len(rows))
            if self.limits.learn(lost):
                culprit = rows.get(lost.culprit_seq) if lost.culprit_seq is not None else None
                which = f" (outbox row {culprit.id})" if culprit is not None else ""
                raise self._fail(
                    SessionFailed(
                        f"{lost}{which}; rows it refuses will be dead-lettered", code=lost.code
                    )
                )
            raise self._fail(SessionFailed(str(lost), code=lost.code))
        return letters

    def unpublishable(self, seq: int, reason: str) -> PendingDeadLetter:
        """The publisher could not encode the envelope ``receive`` answered for ``seq``."""
        row = self._rows.pop(seq)
        outbox = self._row_outboxes.pop(seq, self.primary)
        if outbox.counters is not None:
            outbox.counters.published.inc(-1)
        return self._dead(seq, None, row, reason, outbox=outbox)

    def stored(self, seqs: list[int], now: float) -> None:
        """These dead letters are durable: the flush may pass them."""
        codes = self._letter_codes
        primary = self.primary
        for seq in seqs:
            code, outbox = codes.pop(seq, (reasons.BAD_ROW, primary))
            if outbox.counters is not None:
                outbox.counters.dead_lettered.inc(code)
        self._confirm(sorted(seqs), now)

    def _confirm(self, seqs: list[int], now: float) -> None:
        tracker = self.tracker
        before = tracker.flush_lsn
        tracker.confirm_many(seqs)
        if tracker.flush_lsn != before:
            self.made_progress = True
        txns = self._txns
        upto = tracker.confirmed_upto
        if txns and txns[0][0] <= upto:
            observe = self._observe
            while txns and txns[0][0] <= upto:
                commit_unix = txns.popleft()[3]
                self.confirmed_commit_time = commit_unix
                if observe is not None:
                    observe(max(0.0, now - commit_unix))

    # -- dead letters -----------------------------------------------------------------

    def _dead(
        self,
        seq: int,
        values: tuple[Any, ...] | None,
        row: Any,
        reason: str,
        columns: tuple[str, ...] | None = None,
        *,
        code: str = reasons.BAD_ROW,
        outbox: Outbox | None = None,
    ) -> PendingDeadLetter:
        """A dead letter for ``outbox``'s dead-letter table (None: the first outbox's)."""
        outbox = outbox or self.primary
        self._letter_codes[seq] = (code, outbox)
        if row is not None:
            data, outbox_id = row.as_dict(), row.id
        else:
            data, outbox_id = {"values": [_jsonable(v) for v in values or ()]}, None
            if columns is not None:
                data["columns"] = list(columns)
                id_column = outbox.router.layout.column_of("id") or "id"
                if id_column in columns and values:
                    value = values[columns.index(id_column)]
                    if value is not None:
                        outbox_id = str(_jsonable(value))
        letter = DeadLetter(
            outbox_id=outbox_id,
            reason=reason,
            row=data,
            lsn=self._lsn_of(seq),
            code=code,
            table=outbox.table,
        )
        return PendingDeadLetter(seq, letter)

    def _lsn_of(self, seq: int) -> int:
        """The commit LSN of the transaction that holds ``seq`` (its own, not the current one)."""
        if seq >= self._txn_first_seq:
            return self._txn_lsn
        # Bisected: with every row returned, thousands of transactions can await their
        # dead letters' storing, and a scan per returned row was quadratic.
        txns = self._txns
        i = bisect_left(txns, seq, key=_last_seq)
        if i < len(txns):
            last, first, lsn, _ = txns[i]
            if first <= seq <= last:
                return lsn
        return 0

    # -- status updates -----------------------------------------------------------------

    @property
    def status_due(self) -> bool:
        """The one rule for "send a status update now": the flush moved, or the server asked."""
        return self._reply_requested or self.tracker.flush_lsn > self.sent_flush

    def status_positions(self) -> tuple[int, int]:
        """(write, flush) for the next status update; write is the highest LSN received."""
        flush = self.tracker.flush_lsn
        return max(self.received_lsn, flush), flush

    def status_sent(self, flush: int) -> None:
        self._reply_requested = False
        if flush > self.sent_flush:
            self.sent_flush = flush

    def describe(self) -> str:
        tracker = self.tracker
        return f"{tracker.unconfirmed} in flight, confirmed LSN {format_lsn(tracker.flush_lsn)}"


def _last_seq(txn: tuple[int, int, int, float]) -> int:
    return txn[0]


def _read_if_outbox(
    columns: tuple[str, ...], values: tuple[Any, ...], router: Router
) -> OutboxRow | None:
    """The row as an outbox row when its relation has the outbox's columns (replayable as is).

    A dropped and recreated outbox has a new OID, so until the next session
    validates and adopts it, its rows arrive as "not the outbox"; stored this
    way, ``dead-letters replay`` publishes them.
    """
    try:
        return RowReader(columns, router.layout).read(values)
    except (OutboxSchemaError, UnmappableRow):
        return None


def _reason(exc: BaseException) -> str:
    """A dead letter's reason: the router's own words, else the exception's type and text."""
    if isinstance(exc, UnmappableRow):
        return str(exc)
    text = str(exc)
    if len(text) > 500:
        text = text[:500] + "..."
    return f"cannot map the row: {type(exc).__name__}: {text}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None:
        return None
    return repr(value)


__all__ = [
    "STOP",
    "Action",
    "Outbox",
    "PendingDeadLetter",
    "PublishRefused",
    "SessionCore",
    "SessionFailed",
]

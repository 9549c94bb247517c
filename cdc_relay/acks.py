"""Which LSN is safe to flush to the slot.

The stream arrives in commit order. Every published message gets a sequence
number in publish order; a transaction's Commit closes a "checkpoint" holding
the highest sequence number it used and its ``end_lsn``. A checkpoint becomes
flushable once every sequence number up to its own is confirmed, and only in
order, so the flush position never passes an unconfirmed message and never
moves backwards.

Keepalives are checkpoints too (postgres-logical-replication.md §4.4): a
keepalive ``wal_end`` received while no transaction is open may be flushed once
everything received before it is confirmed, so an idle outbox does not pin WAL.
"""

from __future__ import annotations

from collections import deque


class AckTrackerError(RuntimeError):
    """The stream broke the Begin/Commit nesting the tracker relies on."""


class AckTracker:
    """Pure bookkeeping: receipts in stream order in, a monotonic flush LSN out."""

    __slots__ = (
        "_checkpoints",
        "_confirmed_upto",
        "_flush",
        "_in_transaction",
        "_last_checkpoint_is_keepalive",
        "_out_of_order",
        "_seq",
    )

    def __init__(self, start_flush: int = 0) -> None:
        self._seq = 0  # last sequence number handed out
        self._confirmed_upto = 0  # every seq <= this is confirmed
        self._out_of_order: set[int] = set()  # confirmed seqs above _confirmed_upto
        # (highest seq covered, lsn) in stream order; lsns are increasing.
        self._checkpoints: deque[tuple[int, int]] = deque()
        self._last_checkpoint_is_keepalive = False
        self._in_transaction = False
        self._flush = start_flush

    # -- stream events ------------------------------------------------------

    def begin(self) -> None:
        if self._in_transaction:
            raise AckTrackerError("Begin inside an open transaction")
        self._in_transaction = True

    def add_message(self) -> int:
        """Register one message to publish; returns its sequence number."""
        if not self._in_transaction:
            raise AckTrackerError("message outside a transaction")
        self._seq += 1
        return self._seq

    def commit(self, end_lsn: int) -> None:
        if not self._in_transaction:
            raise AckTrackerError("Commit without Begin")
        self._in_transaction = False
        self._push_checkpoint(end_lsn, keepalive=False)

    def keepalive(self, wal_end: int) -> None:
        """Record a keepalive position; ignored while a transaction is open."""
        if self._in_transaction:
            return
        self._push_checkpoint(wal_end, keepalive=True)

    # -- broker events ------------------------------------------------------

    def confirm(self, seq: int) -> None:
        """Mark one message as durably handled (broker ack, or dead-lettered)."""
        if seq <= self._confirmed_upto or seq > self._seq:
            if seq > self._seq or seq < 1:  # numbers start at 1
                raise AckTrackerError(f"confirm of unknown sequence number {seq}")
            return
        if seq == self._confirmed_upto + 1:
            upto = seq
            pending = self._out_of_order
            while upto + 1 in pending:
                upto += 1
                pending.discard(upto)
            self._confirmed_upto = upto
        else:
            self._out_of_order.add(seq)
        self._advance()

    def confirm_upto(self, seq: int) -> None:
        """Mark every message up to ``seq`` confirmed (an AMQP ``multiple`` ack)."""
        if seq > self._seq or seq < 0:  # 0: "nothing", a no-op
            raise AckTrackerError(f"confirm of unknown sequence number {seq}")
        if seq <= self._confirmed_upto:
            return
        pending = self._out_of_order
        if pending:
            pending.difference_update(range(self._confirmed_upto + 1, seq + 1))
            while seq + 1 in pending:
                seq += 1
                pending.discard(seq)
        self._confirmed_upto = seq
        self._advance()

    def confirm_many(self, seqs: list[int]) -> None:
        """Mark several messages confirmed (one ack frame's worth, increasing)."""
        if not seqs:
            return
        first, last = seqs[0], seqs[-1]
        if first == self._confirmed_upto + 1 and last - first + 1 == len(seqs):
            self.confirm_upto(last)  # the common case: one contiguous run
        else:
            for seq in seqs:  # gaps: returned or dead-lettered messages in between
                self.confirm(seq)

    # -- results ------------------------------------------------------------

    @property
    def flush_lsn(self) -> int:
        """The highest LSN that is safe to report as flushed."""
        return self._flush

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def confirmed_upto(self) -> int:
        """Every sequence number up to this one is confirmed."""
        return self._confirmed_upto

    @property
    def unconfirmed(self) -> int:
        """How many messages are published but not yet confirmed."""
        return self._seq - self._confirmed_upto - len(self._out_of_order)

    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    # -- internals ----------------------------------------------------------

    def _push_checkpoint(self, lsn: int, *, keepalive: bool) -> None:
        checkpoints = self._checkpoints
        if keepalive and checkpoints and self._last_checkpoint_is_keepalive:
            last_seq, last_lsn = checkpoints[-1]
            if last_seq == self._seq:
                # Coalesce consecutive keepalives: only the newest matters.
                checkpoints[-1] = (last_seq, max(last_lsn, lsn))
                self._advance()
                return
        checkpoints.append((self._seq, lsn))
        self._last_checkpoint_is_keepalive = keepalive
        self._advance()

    def _advance(self) -> None:
        checkpoints = self._checkpoints
        upto = self._confirmed_upto
        flush = self._flush
        while checkpoints and checkpoints[0][0] <= upto:
            lsn = checkpoints.popleft()[1]
            if lsn > flush:
                flush = lsn
        if not checkpoints:
            self._last_checkpoint_is_keepalive = False
        self._flush = flush

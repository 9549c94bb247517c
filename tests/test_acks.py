"""The ack tracker: the flush LSN never passes an unconfirmed message, never goes back.

docs/architecture.md ("The life of a row") and the replication protocol: flush only a
Commit ``end_lsn`` whose messages and all earlier ones are confirmed; promote a
keepalive ``wal_end`` only when no transaction is open and everything received
before it is confirmed.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cdc_relay.acks import AckTracker, AckTrackerError


def txn(tracker: AckTracker, n: int, end_lsn: int) -> list[int]:
    """One whole transaction of ``n`` messages; returns their sequence numbers."""
    tracker.begin()
    seqs = [tracker.add_message() for _ in range(n)]
    tracker.commit(end_lsn)
    return seqs


# -- commits -------------------------------------------------------------------


def test_a_fresh_tracker_flushes_nothing() -> None:
    t = AckTracker()
    assert t.flush_lsn == 0
    assert t.unconfirmed == 0
    assert t.last_seq == 0
    assert not t.in_transaction


def test_start_flush_is_the_initial_position() -> None:
    assert AckTracker(start_flush=0x16_B374_D848).flush_lsn == 0x16_B374_D848


def test_sequence_numbers_count_up_from_one_across_transactions() -> None:
    t = AckTracker()
    assert txn(t, 3, 100) == [1, 2, 3]
    assert txn(t, 0, 150) == []
    assert txn(t, 2, 200) == [4, 5]
    assert t.last_seq == 5
    assert t.unconfirmed == 5


def test_flush_waits_for_every_message_of_the_transaction() -> None:
    t = AckTracker()
    a, b, c = txn(t, 3, 100)
    t.confirm(a)
    assert t.flush_lsn == 0
    t.confirm(c)
    assert t.flush_lsn == 0
    assert t.unconfirmed == 1
    t.confirm(b)
    assert t.flush_lsn == 100
    assert t.unconfirmed == 0


def test_flush_is_the_commit_end_lsn_not_before_the_commit() -> None:
    """Confirms that arrive while the transaction is still open flush nothing yet."""
    t = AckTracker()
    t.begin()
    a = t.add_message()
    b = t.add_message()
    t.confirm(a)
    t.confirm(b)
    assert t.flush_lsn == 0
    assert t.unconfirmed == 0
    assert t.in_transaction
    t.commit(300)
    assert t.flush_lsn == 300
    assert not t.in_transaction


def test_confirmed_transactions_flush_in_commit_order() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    (b,) = txn(t, 1, 200)
    (c,) = txn(t, 1, 300)
    t.confirm(a)
    assert t.flush_lsn == 100
    t.confirm(b)
    assert t.flush_lsn == 200
    t.confirm(c)
    assert t.flush_lsn == 300


def test_out_of_order_confirms_never_flush_past_a_gap() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    (b,) = txn(t, 1, 200)
    (c,) = txn(t, 1, 300)
    t.confirm(c)
    assert t.flush_lsn == 0
    t.confirm(b)
    assert t.flush_lsn == 0
    assert t.unconfirmed == 1
    t.confirm(a)  # closes the gap: everything up to c is confirmed at once
    assert t.flush_lsn == 300
    assert t.unconfirmed == 0


def test_out_of_order_confirms_inside_and_across_transactions() -> None:
    t = AckTracker()
    a1, a2 = txn(t, 2, 100)
    b1, b2, b3 = txn(t, 3, 200)
    (c1,) = txn(t, 1, 300)
    for seq in (b3, c1, a2, b1):
        t.confirm(seq)
        assert t.flush_lsn == 0
    t.confirm(a1)
    assert t.flush_lsn == 100  # b2 still outstanding
    assert t.unconfirmed == 1
    t.confirm(b2)
    assert t.flush_lsn == 300


def test_confirm_upto_is_a_multiple_ack() -> None:
    t = AckTracker()
    txn(t, 3, 100)  # 1, 2, 3
    txn(t, 3, 200)  # 4, 5, 6
    t.confirm_upto(2)
    assert t.flush_lsn == 0
    assert t.unconfirmed == 4
    t.confirm_upto(4)
    assert t.flush_lsn == 100
    t.confirm(6)
    assert t.flush_lsn == 100
    assert t.unconfirmed == 1
    t.confirm_upto(5)
    assert t.flush_lsn == 200
    assert t.unconfirmed == 0


def test_confirm_upto_absorbs_earlier_out_of_order_confirms() -> None:
    t = AckTracker()
    txn(t, 2, 100)  # 1, 2
    txn(t, 2, 200)  # 3, 4
    txn(t, 2, 300)  # 5, 6
    t.confirm(2)
    t.confirm(5)
    t.confirm(6)
    assert t.unconfirmed == 3
    # Acks 1..4; 5 and 6 were already confirmed, so everything is.
    t.confirm_upto(4)
    assert t.unconfirmed == 0
    assert t.flush_lsn == 300


def test_confirm_upto_below_what_is_confirmed_is_a_no_op() -> None:
    t = AckTracker()
    txn(t, 3, 100)
    t.confirm_upto(3)
    assert t.flush_lsn == 100
    t.confirm_upto(1)
    t.confirm_upto(0)
    assert t.flush_lsn == 100
    assert t.unconfirmed == 0


def test_duplicate_confirms_are_harmless() -> None:
    t = AckTracker()
    a, b = txn(t, 2, 100)
    (c,) = txn(t, 1, 200)
    t.confirm(c)
    t.confirm(c)  # duplicate while out of order
    t.confirm(a)
    t.confirm(a)  # duplicate of an in-order confirm
    assert t.flush_lsn == 0
    assert t.unconfirmed == 1
    t.confirm(b)
    t.confirm(b)
    t.confirm_upto(1)
    t.confirm_upto(3)
    assert t.flush_lsn == 200
    assert t.unconfirmed == 0


def test_empty_transaction_flushes_once_earlier_ones_are_confirmed() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    txn(t, 0, 150)
    assert t.flush_lsn == 0  # the one before it is unconfirmed
    t.confirm(a)
    assert t.flush_lsn == 150
    txn(t, 0, 180)  # nothing outstanding: flushes at once
    assert t.flush_lsn == 180


def test_empty_transactions_at_the_start_flush_immediately() -> None:
    t = AckTracker()
    txn(t, 0, 100)
    assert t.flush_lsn == 100
    txn(t, 0, 120)
    assert t.flush_lsn == 120


def test_empty_transaction_after_a_confirmed_one_does_not_wait_for_later_ones() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    txn(t, 0, 150)
    (b,) = txn(t, 1, 200)
    t.confirm(a)
    assert t.flush_lsn == 150
    t.confirm(b)
    assert t.flush_lsn == 200


# -- keepalives ----------------------------------------------------------------


def test_keepalive_while_idle_is_flushed_at_once() -> None:
    t = AckTracker()
    t.keepalive(50)
    assert t.flush_lsn == 50
    t.keepalive(70)
    assert t.flush_lsn == 70


def test_keepalive_promoted_only_when_everything_before_it_is_confirmed() -> None:
    t = AckTracker()
    t.keepalive(50)
    assert t.flush_lsn == 50  # idle: the keepalive position is safe
    (a,) = txn(t, 1, 100)
    t.keepalive(500)
    assert t.flush_lsn == 50  # the transaction before it is unconfirmed
    t.confirm(a)
    assert t.flush_lsn == 500  # not just 100: the keepalive came after it


def test_keepalive_after_confirmed_commit_moves_flush_past_it() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    t.confirm(a)
    assert t.flush_lsn == 100
    t.keepalive(400)
    assert t.flush_lsn == 400


def test_keepalive_during_an_open_transaction_is_ignored() -> None:
    t = AckTracker()
    t.begin()
    seq = t.add_message()
    t.keepalive(900)
    t.confirm(seq)
    assert t.flush_lsn == 0
    t.commit(300)
    assert t.flush_lsn == 300  # never 900: that keepalive arrived mid-transaction


def test_keepalive_during_an_empty_open_transaction_is_ignored() -> None:
    t = AckTracker()
    t.begin()
    t.keepalive(900)
    assert t.flush_lsn == 0
    t.commit(300)
    assert t.flush_lsn == 300


def test_keepalive_during_an_open_transaction_is_not_remembered_for_later() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    t.begin()
    b = t.add_message()
    t.keepalive(900)
    t.commit(300)
    t.confirm(a)
    assert t.flush_lsn == 100
    t.confirm(b)
    assert t.flush_lsn == 300


def test_keepalive_waits_for_an_earlier_open_transactions_messages() -> None:
    """A keepalive after a Commit waits for that transaction even if confirmed out of order."""
    t = AckTracker()
    a, b = txn(t, 2, 100)
    t.keepalive(200)
    t.confirm(b)
    assert t.flush_lsn == 0
    t.confirm(a)
    assert t.flush_lsn == 200


def test_consecutive_keepalives_coalesce() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    for lsn in range(200, 1200, 100):
        t.keepalive(lsn)
    # Bounded memory on an idle outbox: one commit and one merged keepalive.
    assert len(t._checkpoints) == 2
    assert t.flush_lsn == 0
    t.confirm(a)
    assert t.flush_lsn == 1100


def test_idle_keepalives_do_not_accumulate() -> None:
    t = AckTracker()
    for lsn in range(1, 10_000):
        t.keepalive(lsn)
    assert t.flush_lsn == 9_999
    assert len(t._checkpoints) == 0


def test_coalesced_keepalive_keeps_the_highest_wal_end() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    t.keepalive(500)
    t.keepalive(300)  # lower than the one before: must not lower the merged checkpoint
    t.confirm(a)
    assert t.flush_lsn == 500


def test_keepalives_between_transactions_each_wait_for_their_predecessors() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    t.keepalive(150)
    (b,) = txn(t, 1, 200)
    t.keepalive(250)
    t.keepalive(260)
    t.confirm(b)
    assert t.flush_lsn == 0
    t.confirm(a)
    assert t.flush_lsn == 260


# -- monotonic ------------------------------------------------------------------


def test_flush_never_moves_backwards_below_start() -> None:
    t = AckTracker(start_flush=1000)
    (a,) = txn(t, 1, 500)
    t.confirm(a)
    assert t.flush_lsn == 1000
    t.keepalive(10)
    assert t.flush_lsn == 1000


def test_keepalive_lower_than_the_last_commit_does_not_move_flush_back() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 500)
    t.confirm(a)
    assert t.flush_lsn == 500
    t.keepalive(400)
    assert t.flush_lsn == 500
    txn(t, 0, 450)
    assert t.flush_lsn == 500
    t.keepalive(600)
    assert t.flush_lsn == 600


def test_stale_keepalive_behind_an_unconfirmed_transaction() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 500)
    t.keepalive(400)  # stale wal_end, but received after the transaction
    assert t.flush_lsn == 0
    t.confirm(a)
    assert t.flush_lsn == 500


# -- protocol violations ----------------------------------------------------------


def test_commit_without_begin() -> None:
    t = AckTracker()
    with pytest.raises(AckTrackerError, match="Commit without Begin"):
        t.commit(1)
    txn(t, 1, 10)
    with pytest.raises(AckTrackerError, match="Commit without Begin"):
        t.commit(20)


def test_nested_begin() -> None:
    t = AckTracker()
    t.begin()
    seq = t.add_message()
    with pytest.raises(AckTrackerError, match="Begin"):
        t.begin()
    # The open transaction is intact.
    assert t.in_transaction
    t.confirm(seq)
    t.commit(100)
    assert t.flush_lsn == 100


def test_message_outside_a_transaction() -> None:
    t = AckTracker()
    with pytest.raises(AckTrackerError, match="outside a transaction"):
        t.add_message()
    txn(t, 1, 100)
    with pytest.raises(AckTrackerError, match="outside a transaction"):
        t.add_message()
    assert t.last_seq == 1


@pytest.mark.parametrize("method", ["confirm", "confirm_upto"])
def test_confirm_of_an_unknown_sequence_number(method: str) -> None:
    t = AckTracker()
    with pytest.raises(AckTrackerError, match="unknown sequence number"):
        getattr(t, method)(1)
    txn(t, 2, 100)
    with pytest.raises(AckTrackerError, match="unknown sequence number 3"):
        getattr(t, method)(3)
    assert t.unconfirmed == 2
    assert t.flush_lsn == 0


@pytest.mark.parametrize("seq", [0, -1])
def test_confirm_of_a_sequence_number_never_handed_out(seq: int) -> None:
    """Sequence numbers start at 1; confirming 0 or less is a caller bug, not a no-op."""
    t = AckTracker()
    txn(t, 2, 100)
    with pytest.raises(AckTrackerError, match="unknown sequence number"):
        t.confirm(seq)
    assert t.unconfirmed == 2
    with pytest.raises(AckTrackerError, match="unknown sequence number"):
        t.confirm_upto(-1)
    t.confirm_upto(0)  # "up to nothing"
    assert t.unconfirmed == 2


def test_error_types() -> None:
    assert issubclass(AckTrackerError, RuntimeError)


# -- scale ------------------------------------------------------------------------


def test_many_messages_confirmed_in_random_order() -> None:
    rng = random.Random(7)
    t = AckTracker()
    seqs: list[int] = []
    commits: list[tuple[int, int]] = []  # (last seq, end_lsn)
    for i in range(1, 2001):
        seqs += txn(t, rng.randint(0, 5), i * 10)
        commits.append((t.last_seq, i * 10))
    rng.shuffle(seqs)
    confirmed = 0  # contiguous prefix confirmed
    done: set[int] = set()
    for seq in seqs:
        t.confirm(seq)
        done.add(seq)
        while confirmed + 1 in done:
            confirmed += 1
        expected = max((lsn for last, lsn in commits if last <= confirmed), default=0)
        assert t.flush_lsn == expected
    assert t.flush_lsn == 20_000
    assert t.unconfirmed == 0


def test_confirm_upto_over_a_large_range() -> None:
    t = AckTracker()
    txn(t, 200_000, 100)
    t.confirm(150_000)
    t.confirm_upto(199_999)
    assert t.unconfirmed == 1
    t.confirm(200_000)
    assert t.flush_lsn == 100


# -- model-based ----------------------------------------------------------------------


class Model:
    """The obviously-correct (and slow) version of the tracker."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.last_seq = 0
        self.confirmed: set[int] = set()
        self.open = False
        # Checkpoints in stream order: (kind, lsn, highest seq received before it).
        self.checkpoints: list[tuple[str, int, int]] = []
        self.ignored_keepalives: list[int] = []

    def all_confirmed_upto(self, seq: int) -> bool:
        return all(s in self.confirmed for s in range(1, seq + 1))

    def expected_flush(self) -> int:
        flush = self.start
        for _, lsn, highest in self.checkpoints:
            if not self.all_confirmed_upto(highest):
                break
            flush = max(flush, lsn)
        return flush

    def first_unconfirmed(self) -> int | None:
        pending = [s for s in range(1, self.last_seq + 1) if s not in self.confirmed]
        return min(pending, default=None)


def check_against_model(t: AckTracker, m: Model, last_flush: int) -> int:
    flush = t.flush_lsn
    # 1. Monotonic.
    assert flush >= last_flush, "flush moved backwards"
    # 2. Only positions that were received (and not ignored) can be flushed.
    received = {m.start} | {lsn for _, lsn, _ in m.checkpoints}
    assert flush in received, f"{flush} is not a commit end_lsn or an accepted keepalive"
    # 3. Safe: never reach the end of a transaction with an unconfirmed message, nor any
    #    keepalive received after it (a stale keepalive may lie below flush already).
    first = m.first_unconfirmed()
    if first is not None:
        for kind, lsn, highest in m.checkpoints:
            if highest >= first and lsn > m.start and kind != "stale keepalive":
                assert flush < lsn, f"flush {flush} passed {kind} {lsn} with seq {first} open"
    # 4. Live and exact: the newest checkpoint of the confirmed prefix.
    assert flush == m.expected_flush()
    # 5. Everything confirmed and nothing open: the latest checkpoint position.
    if first is None and not m.open:
        latest = max([m.start] + [lsn for _, lsn, _ in m.checkpoints])
        assert flush == latest
    # 6. Counters.
    assert t.unconfirmed == m.last_seq - len(m.confirmed)
    assert t.last_seq == m.last_seq
    assert t.in_transaction == m.open
    return flush


class AckTrackerMachine(RuleBasedStateMachine):
    """Random interleavings of stream events and broker confirms."""

    @initialize(start=st.sampled_from([0, 0, 5, 1000]))
    def setup(self, start: int) -> None:
        self.tracker = AckTracker(start_flush=start)
        self.model = Model(start)
        self.lsn = start  # last position received from the stream
        self.last_flush = start

    def outstanding(self) -> list[int]:
        return [s for s in range(1, self.model.last_seq + 1) if s not in self.model.confirmed]

    @precondition(lambda self: not self.model.open)
    @rule()
    def begin(self) -> None:
        self.tracker.begin()
        self.model.open = True

    @precondition(lambda self: self.model.open)
    @rule(n=st.integers(1, 3))
    def add_messages(self, n: int) -> None:
        for _ in range(n):
            seq = self.tracker.add_message()
            self.model.last_seq += 1
            assert seq == self.model.last_seq

    @precondition(lambda self: self.model.open)
    @rule(step=st.integers(1, 100))
    def commit(self, step: int) -> None:
        self.lsn += step
        self.tracker.commit(self.lsn)
        self.model.open = False
        self.model.checkpoints.append(("commit", self.lsn, self.model.last_seq))

    @rule(step=st.integers(0, 100))
    def keepalive(self, step: int) -> None:
        self.lsn += step
        self.tracker.keepalive(self.lsn)
        if self.model.open:
            self.model.ignored_keepalives.append(self.lsn)
        else:
            self.model.checkpoints.append(("keepalive", self.lsn, self.model.last_seq))

    @precondition(lambda self: not self.model.open and self.lsn > 0)
    @rule(data=st.data())
    def stale_keepalive(self, data: st.DataObject) -> None:
        wal_end = data.draw(st.integers(0, self.lsn), label="wal_end")
        self.tracker.keepalive(wal_end)
        self.model.checkpoints.append(("stale keepalive", wal_end, self.model.last_seq))

    @precondition(lambda self: self.model.last_seq > len(self.model.confirmed))
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.outstanding()), label="seq")
        self.tracker.confirm(seq)
        self.model.confirmed.add(seq)

    @precondition(lambda self: len(self.model.confirmed) > 0)
    @rule(data=st.data())
    def confirm_again(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.model.confirmed)), label="seq")
        self.tracker.confirm(seq)

    @precondition(lambda self: self.model.last_seq > 0)
    @rule(data=st.data())
    def confirm_upto(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.model.last_seq), label="upto")
        self.tracker.confirm_upto(seq)
        self.model.confirmed.update(range(1, seq + 1))

    @invariant()
    def matches_the_model(self) -> None:
        self.last_flush = check_against_model(self.tracker, self.model, self.last_flush)
        received = {self.model.start} | {lsn for _, lsn, _ in self.model.checkpoints}
        for ignored in self.model.ignored_keepalives:
            if ignored not in received:
                assert self.tracker.flush_lsn != ignored


AckTrackerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestAckTrackerStateful = AckTrackerMachine.TestCase


# A flat event stream: exercises long runs of one kind (many keepalives, many confirms).
events = st.lists(
    st.one_of(
        st.tuples(st.just("txn"), st.integers(0, 4)),
        st.tuples(st.just("open"), st.integers(0, 3)),
        st.tuples(st.just("commit"), st.integers(1, 50)),
        st.tuples(st.just("keepalive"), st.integers(0, 50)),
        st.tuples(st.just("confirm"), st.integers(0, 1000)),
        st.tuples(st.just("confirm_upto"), st.integers(0, 1000)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_event_streams_against_the_model(stream: list[tuple[str, int]]) -> None:
    t = AckTracker()
    m = Model(0)
    lsn = 0
    last_flush = 0
    for kind, value in stream:
        if kind == "txn" and not m.open:
            lsn += 10
            txn(t, value, lsn)
            m.last_seq += value
            m.checkpoints.append(("commit", lsn, m.last_seq))
        elif kind == "open":
            if not m.open:
                t.begin()
                m.open = True
            for _ in range(value):
                t.add_message()
                m.last_seq += 1
        elif kind == "commit" and m.open:
            lsn += value
            t.commit(lsn)
            m.open = False
            m.checkpoints.append(("commit", lsn, m.last_seq))
        elif kind == "keepalive":
            lsn += value
            t.keepalive(lsn)
            if not m.open:
                m.checkpoints.append(("keepalive", lsn, m.last_seq))
        elif kind == "confirm":
            outstanding = [s for s in range(1, m.last_seq + 1) if s not in m.confirmed]
            if outstanding:
                seq = outstanding[value % len(outstanding)]
                t.confirm(seq)
                m.confirmed.add(seq)
        elif kind == "confirm_upto" and m.last_seq:
            upto = value % (m.last_seq + 1)
            t.confirm_upto(upto)
            m.confirmed.update(range(1, upto + 1))
        last_flush = check_against_model(t, m, last_flush)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=15), st.randoms(use_true_random=False))
def test_any_confirm_order_ends_at_the_last_commit(sizes: list[int], rnd: random.Random) -> None:
    t = AckTracker()
    seqs: list[int] = []
    for i, n in enumerate(sizes, 1):
        seqs += txn(t, n, i * 100)
    t.keepalive(len(sizes) * 100 + 7)
    rnd.shuffle(seqs)
    last = t.flush_lsn
    for seq in seqs:
        t.confirm(seq)
        assert t.flush_lsn >= last
        last = t.flush_lsn
    assert t.unconfirmed == 0
    assert t.flush_lsn == len(sizes) * 100 + 7


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=10),
    st.data(),
)
def test_confirm_upto_equals_confirming_each(sizes: list[int], data: st.DataObject) -> None:
    one, many = AckTracker(), AckTracker()
    for i, n in enumerate(sizes, 1):
        txn(one, n, i * 10)
        txn(many, n, i * 10)
    total = one.last_seq
    upto = data.draw(st.integers(0, total), label="upto")
    extra = data.draw(st.sets(st.integers(1, total)) if total else st.just(set()), label="extra")
    for seq in sorted(extra):
        one.confirm(seq)
        many.confirm(seq)
    one.confirm_upto(upto)
    for seq in range(1, upto + 1):
        many.confirm(seq)
    assert one.flush_lsn == many.flush_lsn
    assert one.unconfirmed == many.unconfirmed


@given(
    st.integers(min_value=1, max_value=30),
    st.lists(st.integers(min_value=1, max_value=30), unique=True),
    st.lists(st.integers(min_value=1, max_value=30), unique=True),
)
def test_confirm_many_equals_confirming_one_by_one(
    messages: int, earlier: list[int], batch: list[int]
) -> None:
    """An ack frame's batch (contiguous or with gaps) acts like its confirms in order."""
    batched, single = AckTracker(), AckTracker()
    for tracker in (batched, single):
        tracker.begin()
        for _ in range(messages):
            tracker.add_message()
        tracker.commit(100)
        for seq in earlier:
            if seq <= messages:
                tracker.confirm(seq)
    seqs = sorted(seq for seq in batch if seq <= messages)
    batched.confirm_many(seqs)
    for seq in seqs:
        single.confirm(seq)
    assert (batched.flush_lsn, batched.confirmed_upto, batched.unconfirmed) == (
        single.flush_lsn,
        single.confirmed_upto,
        single.unconfirmed,
    )

"""The ack tracker: the flush LSN never passes an unconfirmed message, never goes back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.acks import AckTracker, AckTrackerError


def txn(tracker: AckTracker, n: int, end_lsn: int) -> list[int]:
    tracker.begin()
    seqs = [tracker.add_message() for _ in range(n)]
    tracker.commit(end_lsn)
    return seqs


def test_flush_waits_for_every_message_of_the_transaction() -> None:
    t = AckTracker()
    a, b = txn(t, 2, 100)
    assert t.flush_lsn == 0
    t.confirm(a)
    assert t.flush_lsn == 0
    t.confirm(b)
    assert t.flush_lsn == 100


def test_out_of_order_confirms_flush_in_commit_order() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    (b,) = txn(t, 1, 200)
    (c,) = txn(t, 1, 300)
    t.confirm(c)
    t.confirm(b)
    assert t.flush_lsn == 0
    assert t.unconfirmed == 1
    t.confirm(a)
    assert t.flush_lsn == 300
    assert t.unconfirmed == 0


def test_confirm_upto_is_a_multiple_ack() -> None:
    t = AckTracker()
    txn(t, 3, 100)
    txn(t, 3, 200)
    t.confirm_upto(4)
    assert t.flush_lsn == 100
    t.confirm(6)
    assert t.flush_lsn == 100
    t.confirm_upto(5)
    assert t.flush_lsn == 200


def test_empty_transaction_flushes_once_earlier_ones_are_confirmed() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    txn(t, 0, 150)
    assert t.flush_lsn == 0
    t.confirm(a)
    assert t.flush_lsn == 150
    txn(t, 0, 180)
    assert t.flush_lsn == 180


def test_keepalive_promoted_only_when_nothing_is_open_or_unconfirmed() -> None:
    t = AckTracker()
    t.keepalive(50)
    assert t.flush_lsn == 50  # idle: the keepalive position is safe
    (a,) = txn(t, 1, 100)
    t.keepalive(500)
    assert t.flush_lsn == 50  # the transaction before it is unconfirmed
    t.confirm(a)
    assert t.flush_lsn == 500


def test_keepalive_inside_an_open_transaction_is_ignored() -> None:
    t = AckTracker()
    t.begin()
    seq = t.add_message()
    t.keepalive(900)
    t.confirm(seq)
    assert t.flush_lsn == 0
    t.commit(300)
    assert t.flush_lsn == 300


def test_consecutive_keepalives_coalesce() -> None:
    t = AckTracker()
    (a,) = txn(t, 1, 100)
    for lsn in range(200, 1200, 100):
        t.keepalive(lsn)
    assert len(t._checkpoints) == 2  # one commit, one (merged) keepalive
    t.confirm(a)
    assert t.flush_lsn == 1100


def test_flush_never_moves_backwards() -> None:
    t = AckTracker(start_flush=1000)
    (a,) = txn(t, 1, 500)
    t.confirm(a)
    assert t.flush_lsn == 1000
    t.keepalive(10)
    assert t.flush_lsn == 1000


def test_protocol_violations_raise() -> None:
    t = AckTracker()
    with pytest.raises(AckTrackerError):
        t.commit(1)
    with pytest.raises(AckTrackerError):
        t.add_message()
    t.begin()
    with pytest.raises(AckTrackerError):
        t.begin()
    with pytest.raises(AckTrackerError):
        t.confirm(5)
    with pytest.raises(AckTrackerError):
        t.confirm_upto(5)


def test_duplicate_confirms_are_harmless() -> None:
    t = AckTracker()
    (a, b) = txn(t, 2, 100)
    t.confirm(a)
    t.confirm(a)
    assert t.flush_lsn == 0
    t.confirm(b)
    t.confirm(b)
    t.confirm_upto(1)
    assert t.flush_lsn == 100 and t.unconfirmed == 0


# A stream of events; the reference model checks every invariant after each one.
events = st.lists(
    st.one_of(
        st.tuples(st.just("txn"), st.integers(0, 4)),
        st.tuples(st.just("open"), st.integers(1, 3)),
        st.tuples(st.just("keepalive"), st.integers(0, 50)),
        st.tuples(st.just("confirm"), st.integers(0, 1000)),
        st.tuples(st.just("confirm_upto"), st.integers(0, 1000)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_invariants_against_a_reference_model(stream: list[tuple[str, int]]) -> None:
    t = AckTracker()
    lsn = 0
    confirmed: set[int] = set()
    outstanding: list[int] = []
    # Checkpoints as the model sees them: (lsn, seqs that must be confirmed first).
    checkpoints: list[tuple[int, int]] = []  # (lsn, highest seq before it)
    received_positions = {0}
    open_txn_seqs: list[int] | None = None
    last_flush = 0
    for kind, value in stream:
        if kind == "txn":
            if open_txn_seqs is not None:
                continue
            lsn += 10
            seqs = txn(t, value, lsn)
            outstanding += seqs
            checkpoints.append((lsn, t.last_seq))
            received_positions.add(lsn)
        elif kind == "open":
            if open_txn_seqs is None:
                t.begin()
                open_txn_seqs = []
            for _ in range(value):
                seq = t.add_message()
                open_txn_seqs.append(seq)
                outstanding.append(seq)
            if len(open_txn_seqs) > 4:
                lsn += 10
                t.commit(lsn)
                checkpoints.append((lsn, t.last_seq))
                received_positions.add(lsn)
                open_txn_seqs = None
        elif kind == "keepalive":
            lsn += value
            t.keepalive(lsn)
            if open_txn_seqs is None:
                checkpoints.append((lsn, t.last_seq))
                received_positions.add(lsn)
        elif kind == "confirm" and outstanding:
            seq = outstanding.pop(value % len(outstanding))
            t.confirm(seq)
            confirmed.add(seq)
        elif kind == "confirm_upto" and outstanding:
            upto = sorted(outstanding)[value % len(outstanding)]
            t.confirm_upto(upto)
            confirmed.update(range(1, upto + 1))
            outstanding = [s for s in outstanding if s > upto]

        flush = t.flush_lsn
        assert flush >= last_flush, "flush moved backwards"
        assert flush in received_positions, "flush is not a commit end_lsn or keepalive"
        # Safe: every checkpoint at or below flush has all its earlier seqs confirmed.
        for cp_lsn, highest in checkpoints:
            if cp_lsn <= flush:
                assert all(s in confirmed for s in range(1, highest + 1))
        # Live: the highest checkpoint whose earlier seqs are all confirmed is flushed.
        ready = [
            cp for cp, highest in checkpoints if all(s in confirmed for s in range(1, highest + 1))
        ]
        expected = 0
        for cp, highest in checkpoints:
            if all(s in confirmed for s in range(1, highest + 1)):
                expected = cp
            else:
                break
        assert flush == expected, (flush, expected, ready)
        assert t.unconfirmed == t.last_seq - len(confirmed)
        last_flush = flush

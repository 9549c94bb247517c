"""CommitClock: commit-to-confirm per transaction, without servers."""

from __future__ import annotations

import pytest

from cdc_relay.latency import POSTGRES_EPOCH_UNIX, CommitClock, postgres_ts_to_unix


def pg_ts(unix: float) -> int:
    return round((unix - POSTGRES_EPOCH_UNIX) * 1_000_000)


def test_postgres_epoch() -> None:
    assert postgres_ts_to_unix(0) == 946_684_800  # 2000-01-01T00:00:00Z
    assert postgres_ts_to_unix(1_500_000) == 946_684_801.5


def test_a_transaction_finishes_when_its_last_message_is_confirmed() -> None:
    clock = CommitClock()
    clock.committed(3, pg_ts(1000.0))  # messages 1..3
    clock.committed(4, pg_ts(1000.5))  # message 4
    assert clock.confirmed(2, 1001.0) == []
    assert clock.confirmed(3, 1001.0) == pytest.approx([1.0])
    assert not clock.has_confirmed(3)
    assert clock.confirmed(4, 1002.0) == pytest.approx([1.5])
    assert not clock.has_confirmed(10**9)


def test_one_multiple_ack_finishes_several_in_commit_order() -> None:
    clock = CommitClock()
    for last_seq, at in ((1, 10.0), (2, 11.0), (5, 12.0)):
        clock.committed(last_seq, pg_ts(at))
    assert clock.confirmed(5, 20.0) == pytest.approx([10.0, 9.0, 8.0])


def test_clock_skew_never_gives_negative_latency() -> None:
    clock = CommitClock()
    clock.committed(1, pg_ts(100.0))
    assert clock.confirmed(1, 99.0) == [0.0]


def test_has_confirmed_matches_confirmed() -> None:
    clock = CommitClock()
    assert not clock.has_confirmed(10)
    clock.committed(3, pg_ts(1.0))
    assert not clock.has_confirmed(2)
    assert clock.has_confirmed(3)
    clock.confirmed(3, 2.0)
    assert not clock.has_confirmed(3)

"""Commit-to-confirm latency per transaction, measured inside the relay.

pgoutput's Commit carries the transaction's commit timestamp (Postgres'
clock); a transaction is done once the broker confirmed its last message.
The difference is the number a user cares about ("how long after my COMMIT
is the event safely in RabbitMQ"), and it leaves out consumer time, which the
relay cannot control. Both clocks are wall clocks: on two hosts the result
includes their clock offset.
"""

from __future__ import annotations

from collections import deque

# Postgres timestamps count microseconds from 2000-01-01 00:00:00 UTC.
POSTGRES_EPOCH_UNIX = 946_684_800


def postgres_ts_to_unix(ts: int) -> float:
    return ts / 1_000_000 + POSTGRES_EPOCH_UNIX


class CommitClock:
    """Pure bookkeeping: transactions in stream order, latencies out as they finish."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        # (highest sequence number of the transaction, commit time as Unix seconds)
        self._pending: deque[tuple[int, float]] = deque()

    def committed(self, last_seq: int, commit_ts: int) -> None:
        """A transaction whose messages end at ``last_seq`` committed at ``commit_ts``."""
        self._pending.append((last_seq, postgres_ts_to_unix(commit_ts)))

    def has_confirmed(self, confirmed_upto: int) -> bool:
        """Whether ``confirmed`` would return anything (cheap: no clock read needed)."""
        pending = self._pending
        return bool(pending) and pending[0][0] <= confirmed_upto

    def confirmed(self, confirmed_upto: int, now: float) -> list[float]:
        """Seconds from commit to ``now`` of every transaction now fully confirmed."""
        pending = self._pending
        done: list[float] = []
        while pending and pending[0][0] <= confirmed_upto:
            done.append(max(0.0, now - pending.popleft()[1]))
        return done

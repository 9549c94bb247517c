"""When to send a standby status update, and when Postgres has been silent too long.

Pure: the caller passes the clock in. Status updates are timer-driven (every
``interval``), go out early when the session core says one is due (the flush
moved, or the server asked for a reply), and never closer together than
``min_gap``, so a stream of acks cannot become a storm of updates.

Liveness: a silent partition can keep TCP up (and a middlebox may answer TCP
keepalives), so silence while we wait for data is measured here. After a third
of the timeout each update asks the server for a reply; after the whole
timeout the connection is presumed dead. The effective timeout is never below
the server's ``wal_sender_timeout`` (with a margin): a walsender decoding a
long transaction of changes that are not ours may stay silent for about that
long, and giving up sooner would replay the same transaction forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

STATUS_MIN_GAP: Final = 0.02  # seconds between two status updates: no storms, ever
WAL_SENDER_TIMEOUT_MARGIN: Final = 1.5  # effective timeout >= this x wal_sender_timeout


def effective_pg_timeout(pg_timeout: float, wal_sender_timeout: float) -> float:
    """``--pg-timeout``, raised to outlast the server's own silence (0 = disabled there)."""
    if wal_sender_timeout > 0:
        return max(pg_timeout, WAL_SENDER_TIMEOUT_MARGIN * wal_sender_timeout)
    return pg_timeout


@dataclass(slots=True, frozen=True)
class Send:
    """Send a status update now."""

    reply_requested: bool


@dataclass(slots=True, frozen=True)
class Dead:
    """No data from Postgres for ``silent`` seconds while waiting: end the session."""

    silent: float


class StatusSchedule:
    """The status timer and the Postgres liveness rule, with a fake-able clock."""

    __slots__ = ("_interval", "_last_sent", "_min_gap", "_timeout")

    def __init__(
        self, interval: float, timeout: float, now: float, min_gap: float = STATUS_MIN_GAP
    ) -> None:
        self._interval = min(interval, timeout / 4)
        self._timeout = timeout
        self._min_gap = min_gap
        self._last_sent = now - interval  # the first update may go out at once

    @property
    def timeout(self) -> float:
        return self._timeout

    def wait_time(self, now: float, *, due: bool) -> float:
        """How long the status loop may sleep before asking ``decide`` again."""
        since = now - self._last_sent
        if due:
            return max(0.0, self._min_gap - since)
        return max(0.0, min(self._interval - since, self._timeout / 3))

    def decide(self, now: float, *, due: bool, silent: float | None) -> Send | Dead | None:
        """``silent``: seconds since data last arrived while waiting for it, else None."""
        if silent is not None and silent > self._timeout:
            return Dead(silent)
        since = now - self._last_sent
        if since < self._min_gap:
            return None
        asking = silent is not None and silent > self._timeout / 3
        if due or asking or since >= self._interval:
            return Send(reply_requested=asking)
        return None

    def sent(self, now: float) -> None:
        self._last_sent = now

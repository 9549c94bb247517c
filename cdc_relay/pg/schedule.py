"""When to send a standby status update, and when Postgres has been silent too long.

Pure: the caller passes the clock in. Status updates are timer-driven (every
``interval``), go out early when the session core says one is due (the flush
moved, or the server asked for a reply), and never closer together than
``min_gap``, so a stream of acks cannot become a storm of updates.

Liveness: a silent partition can keep TCP up (and a middlebox may answer TCP
keepalives), so silence while we wait for data is measured here. After a third
of the timeout each update asks the server for a reply; after the whole
timeout the schedule answers ``Probe``: the caller asks Postgres on a fresh
connection whether our walsender still runs. A walsender decoding a long
transaction of changes that are not ours stays silent for up to half its
``wal_sender_timeout`` and does not read our reply requests meanwhile; ending
the session then would replay the same transaction forever. If the probe
says the walsender is alive, ``reprieve`` grants another full timeout; if the
server does not answer, or our walsender is gone, the connection is dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

STATUS_MIN_GAP: Final = 0.02  # seconds between two status updates: no storms, ever


@dataclass(slots=True, frozen=True)
class Send:
    """Send a status update now."""

    reply_requested: bool


@dataclass(slots=True, frozen=True)
class Probe:
    """No data from Postgres for ``silent`` seconds while waiting: is it busy, or gone?"""

    silent: float


class StatusSchedule:
    """The status timer and the Postgres liveness rule, with a fake-able clock."""

    __slots__ = ("_interval", "_last_sent", "_min_gap", "_reprieved_at", "_timeout")

    def __init__(
        self, interval: float, timeout: float, now: float, min_gap: float = STATUS_MIN_GAP
    ) -> None:
        self._interval = min(interval, timeout / 4)
        self._timeout = timeout
        self._min_gap = min_gap
        self._last_sent = now - interval  # the first update may go out at once
        self._reprieved_at = float("-inf")

    @property
    def timeout(self) -> float:
        return self._timeout

    def wait_time(self, now: float, *, due: bool) -> float:
        """How long the status loop may sleep before asking ``decide`` again."""
        since = now - self._last_sent
        if due:
            return max(0.0, self._min_gap - since)
        return max(0.0, min(self._interval - since, self._timeout / 3))

    def decide(self, now: float, *, due: bool, silent: float | None) -> Send | Probe | None:
        """``silent``: seconds since data last arrived while waiting for it, else None."""
        if silent is not None and min(silent, now - self._reprieved_at) > self._timeout:
            return Probe(silent)
        since = now - self._last_sent
        if since < self._min_gap:
            return None
        asking = silent is not None and silent > self._timeout / 3
        if due or asking or since >= self._interval:
            return Send(reply_requested=asking)
        return None

    def sent(self, now: float) -> None:
        self._last_sent = now

    def reprieve(self, now: float) -> None:
        """The probe found Postgres alive and our walsender running: wait another timeout."""
        self._reprieved_at = now

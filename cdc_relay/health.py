"""What the running relay knows is wrong, and what publication drift means: decisions only.

Nothing here awaits or touches a connection. The relay reports trouble into
``Problems`` (any part of it, by a short key); the state writer persists the
summary in the ``<outbox>_relay_state`` row, where ``cdc-relay status`` (another
process, often another host) reads it. ``judge_drift`` turns one look at the
catalogs into what the relay must do: nothing, say so, or start a new session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cdc_relay.state import DEFAULT_MARGIN, format_since

DRIFT_CHECK_INTERVAL: Final = 5.0  # seconds between looks at the publication and the outbox
DRIFT_KEY: Final = "publication"


def drift_key(table: str) -> str:
    """The problem key of a further outbox's drift (the first outbox's is ``DRIFT_KEY``)."""
    return f"{DRIFT_KEY} {table}"


class Problems:
    """Trouble by key (``publication``, ``dead-letters``, ...): text and when it began.

    Reporting the same key again keeps its start; clearing a key that is not
    there is a no-op, so callers need not remember what they reported.
    """

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, datetime]] = {}
        self.version = 0  # bumped on every change: the writer persists changes at once

    def report(self, key: str, text: str, now: datetime | None = None) -> None:
        since = self._items[key][1] if key in self._items else (now or datetime.now(UTC))
        if self._items.get(key) != (text, since):
            self._items[key] = (text, since)
            self.version += 1

    def clear(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            self.version += 1

    def get(self, key: str) -> str | None:
        item = self._items.get(key)
        return None if item is None else item[0]

    def summary(self) -> tuple[str | None, datetime | None]:
        """All problems in one line (oldest first) and when the oldest began; (None, None)."""
        if not self._items:
            return None, None
        ordered = sorted(self._items.values(), key=lambda item: item[1])
        return "; ".join(text for text, _ in ordered), ordered[0][1]


@dataclass(frozen=True, slots=True)
class Drift:
    """The outbox is not (or no longer) published as the session started with."""

    message: str  # ERROR line, naming the fix
    end_session: bool  # a recreated outbox the publication covers: adopt it in a new session


def judge_drift(
    *,
    publication: str,
    table: str,
    started_relid: int,
    current_relid: int | None,
    covered: bool,
    since: datetime,
    slot: str = "cdc_relay",
) -> Drift | None:
    """What one look at the catalogs means; None while the publication covers our outbox.

    ``since`` is when rows may have begun to be skipped (see ``drift_since``).
    A table-less outbox (``started_relid`` 0) has nothing to drift.
    """
    if started_relid == 0:
        return None
    if current_relid is None:
        return Drift(
            f"outbox table {table} was dropped: nothing can be written to it; recreate it "
            "with `cdc-relay init` (it adds the new table to the publication)",
            end_session=False,
        )
    if current_relid != started_relid and covered:
        return Drift(
            f"outbox table {table} was recreated (OID {started_relid} -> {current_relid}): "
            "starting a new session to validate and adopt it; if rows were written to it "
            f"before it joined publication {publication}, {republish_hint(slot, since)}",
            end_session=True,
        )
    if covered:
        return None
    add = f"ALTER PUBLICATION {publication} ADD TABLE {table}"
    return Drift(
        f"publication {publication} does not cover the outbox {table}: its rows committed "
        f"since about {format_since(since)} are not published. Run `{add}`, then "
        + republish_hint(slot, since),
        end_session=False,
    )


def republish_hint(slot: str, since: datetime) -> str:
    """How to send the rows a drift skipped (``resync`` refuses a healthy slot: drop it first)."""
    slot_option = f" --slot {slot}" if slot != "cdc_relay" else ""
    return (
        "republish what was skipped: stop the relay, "
        f"`cdc-relay drop{slot_option} --force --yes`, and "
        f"`cdc-relay resync{slot_option} --since {format_since(since)}` (consumers dedupe "
        "the repeats)"
    )


@dataclass(frozen=True, slots=True)
class DriftStep:
    """What the relay does after one look: say, report or clear, maybe end the session."""

    error: str | None = None  # a line to log at ERROR (a new drift, or the end of one)
    problem: str | None = None  # drifting: report this (readiness 0); None: not drifting
    ended: bool = False  # a drift just ended: clear the problem, readiness 1
    end_session: str | None = None  # adopt a recreated outbox: end the session with this


class DriftWatch:
    """One session's drift state: when the drift began, and what was said about it.

    Each ``observe`` is one look at the catalogs; the relay performs the step.
    A drift is said once (and again only when it changes); when it ends, the
    rows it skipped are named with the command that republishes them.
    """

    def __init__(self, *, publication: str, table: str, slot: str, outbox_relid: int) -> None:
        self.publication = publication
        self.table = table
        self.slot = slot
        self.outbox_relid = outbox_relid
        self.since: datetime | None = None
        self._said: str | None = None

    def observe(
        self,
        current_relid: int | None,
        covered: bool,
        confirmed_commit_time: float | None,
        now: float,
    ) -> DriftStep:
        since = self.since or drift_since(confirmed_commit_time, now)
        drift = judge_drift(
            publication=self.publication,
            table=self.table,
            started_relid=self.outbox_relid,
            current_relid=current_relid,
            covered=covered,
            since=since,
            slot=self.slot,
        )
        if drift is not None and not drift.end_session:
            self.since = since
            error = None if drift.message == self._said else drift.message
            self._said = drift.message
            return DriftStep(error=error, problem=drift.message)
        end_session = drift.message if drift is not None else None
        if self.since is None:
            return DriftStep(end_session=end_session)
        error = (
            f"publication {self.publication} covers the outbox again; rows committed since "
            f"about {format_since(self.since)} were not published: "
            + republish_hint(self.slot, self.since)
        )
        self.since, self._said = None, None
        return DriftStep(error=error, ended=True, end_session=end_session)


def drift_since(confirmed_commit_time: float | None, now: float) -> datetime:
    """When skipping may have begun: the last confirmed commit (else now) minus the margin.

    The drift may predate the check that saw it by a whole interval, and a
    transaction that committed later may have stamped ``created_at`` earlier;
    the same margin ``resync`` uses by default covers both.
    """
    base = confirmed_commit_time if confirmed_commit_time is not None else now
    return datetime.fromtimestamp(base, UTC) - DEFAULT_MARGIN


def since_when(condition: bool, previous: datetime | None, now: datetime) -> datetime | None:
    """When ``condition`` became true (kept while it stays true), or None while it is false."""
    return (previous or now) if condition else None


class FlushWatch:
    """Since when the flush position has not moved while messages were waiting for it.

    ``status`` calls a flush that has not moved for ``--max-stall`` with rows
    waiting a stall (a blocked broker, a lost confirm, a stuck dead-letter write).
    """

    def __init__(self) -> None:
        self._flush = -1
        self._since: datetime | None = None

    def update(self, flush: int, unconfirmed: int, now: datetime) -> datetime | None:
        if unconfirmed == 0:
            self._since = None
        elif flush != self._flush or self._since is None:
            self._since = now
        self._flush = flush
        return self._since

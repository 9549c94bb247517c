"""Where the relay last was, kept in a tiny table so ``resync`` can start from there.

One row per slot in ``<outbox>_relay_state``: the commit time and end LSN of
the newest transaction whose messages were all confirmed, when that was
written, and whether a ``resync`` is under way (``resync_guard.py`` reads that
mark). The row exists for one reader: after a slot is lost, ``cdc-relay
resync`` without ``--since`` starts from the recorded commit time minus a
margin (a transaction that committed later may have inserted its rows, with
``created_at = now()`` at its start, earlier).

A second reader since issue 16: ``cdc-relay status`` (another process, often
another host) reads the running relay's health from the same row: its
problems, since when RabbitMQ blocks it, since when its flush has waited,
and a heartbeat that says the report is current (``HEALTH_COLUMNS``).

The trade-off, chosen: one small UPDATE every few seconds (``RECORD_INTERVAL``)
on a row nobody else writes, against guessing ``--since`` after an outage. The
row may lag the slot by up to that interval; lagging only means more duplicates
on a resync, never a gap, so writes are throttled and a failed write is not a
reason to stop streaming.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay import schema
from cdc_relay.config import Settings
from cdc_relay.lsn import Lsn, format_lsn
from cdc_relay.redact import one_line
from cdc_relay.schema import qualified

log = logging.getLogger("cdc_relay")

RECORD_INTERVAL: Final = 5.0  # seconds between the relay's writes of its position
STATEMENT_TIMEOUT_MS: Final = 5000  # a locked state row must never stall the relay

# The running relay's trouble, for `status` in another process: what is wrong
# (``problem``), since when the broker blocks it, since when its flush position
# has not moved with messages unconfirmed (``waiting_since``), and when it last
# said so (``heartbeat_at``: older than HEARTBEAT_STALE means no relay is saying).
HEALTH_COLUMNS: Final = (
    "problem",
    "problem_since",
    "broker_blocked_since",
    "waiting_since",
    "heartbeat_at",
)
HEARTBEAT_STALE: Final = timedelta(seconds=60)


def table_name(settings: Settings) -> tuple[str, str]:
    """``<outbox>_relay_state`` next to the outbox (``public.outbox_relay_state``)."""
    return schema.state_table(settings.table_parts)


def create(conn: psycopg.Connection[Any], table: tuple[str, str]) -> list[str]:
    """Create the state table if missing (``init`` and ``resync``); one report line."""
    existed = exists(conn, table)
    conn.execute(schema.state_ddl(table))
    if existed and not _has_column(conn, table, "system_identifier"):
        conn.execute(schema.state_add_system_identifier(table))
    name = ".".join(table)
    return [f"relay state table {name}: {'already exists' if existed else 'created'}"]


def _has_column(conn: psycopg.Connection[Any], table: tuple[str, str], column: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s"
        " AND NOT attisdropped",
        (qualified(*table).as_string(conn), column),
    ).fetchone()
    return row is not None


def exists(conn: psycopg.Connection[Any], table: tuple[str, str]) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r'",
        table,
    ).fetchone()
    return row is not None


@dataclass(frozen=True, slots=True)
class RelayState:
    """The state row of one slot."""

    slot: str
    confirmed_commit_at: datetime | None
    confirmed_lsn: str | None
    updated_at: datetime
    resync_since: datetime | None
    system_identifier: str | None = None  # of the server whose WAL confirmed_lsn is in


def read(conn: psycopg.Connection[Any], table: tuple[str, str], slot: str) -> RelayState | None:
    """The slot's row, or None (no row, or no state table: an older setup)."""
    if not exists(conn, table):
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT slot_name, confirmed_commit_at, confirmed_lsn::text, updated_at, resync_since,"
            " to_jsonb(s) ->> 'system_identifier' FROM {} s WHERE slot_name = %s"
        ).format(qualified(*table)),
        (slot,),
    ).fetchone()
    return None if row is None else RelayState(*row)


# -- where a session starts streaming ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """An LSN up to which every message was confirmed by the broker, and whose WAL it is in."""

    lsn: int
    system_identifier: str
    timeline: int | None  # None: valid on any timeline of the system (the state row's)


def start_position(
    known: list[Position], system_identifier: str, timeline: int, wal_end: int
) -> int:
    """The highest known confirmed position that is safe to pass to START_REPLICATION (0: none).

    Before PostgreSQL 17 a logical slot's confirmed position is saved at shutdown
    only if its restart_lsn moved, which any open transaction prevents: a fast
    restart rewound it to the last checkpoint (measured on 15/16: every row since
    the relay started, sent again). The server starts at max(this, the slot's own).

    A position is used only on the WAL it was measured in, and never past the
    server's end of WAL: on the same system a slot created again later starts
    after every earlier position (its consistent point is past the WAL then
    written), so the slot's own position wins. Another system (a restored dump)
    has unrelated positions. A session's own position is tied to its timeline,
    since a promoted standby's WAL may end before it and then diverge; the state
    row's may be used on any timeline, because the write that recorded it comes
    after it in the same WAL, so a server that has the row has that WAL.
    """
    usable = [
        p.lsn
        for p in known
        if p.system_identifier == system_identifier
        and (p.timeline is None or p.timeline == timeline)
        and p.lsn <= wal_end
    ]
    return max(usable, default=0)


def recorded_position(recorded: RelayState | None) -> Position | None:
    """The state row's position, when it says which system it belongs to."""
    if recorded is None or recorded.confirmed_lsn is None or not recorded.system_identifier:
        return None
    return Position(int(Lsn.parse(recorded.confirmed_lsn)), recorded.system_identifier, None)


async def record(
    conn: psycopg.AsyncConnection[Any],
    table: tuple[str, str],
    slot: str,
    commit_time: float,
    lsn: int,
    system_identifier: str | None = None,
) -> None:
    """Upsert the newest fully confirmed transaction (commit time as Unix seconds, end LSN).

    Never moves the row backwards: a relay that restarted from an older
    position (or a second relay) does not undo a newer record, unless the row
    is another system's (a restored dump), whose positions mean nothing here.
    Without ``system_identifier`` (a table older than that column) it is not written.
    """
    if system_identifier is None:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {t} AS s (slot_name, confirmed_commit_at, confirmed_lsn, updated_at)"
                " VALUES (%s, %s, %s::pg_lsn, now())"
                " ON CONFLICT (slot_name) DO UPDATE SET"
                " confirmed_commit_at = EXCLUDED.confirmed_commit_at,"
                " confirmed_lsn = EXCLUDED.confirmed_lsn, updated_at = now()"
                " WHERE s.confirmed_lsn IS NULL OR s.confirmed_lsn <= EXCLUDED.confirmed_lsn"
            ).format(t=qualified(*table)),
            (slot, datetime.fromtimestamp(commit_time, UTC), format_lsn(lsn)),
        )
        return
    await conn.execute(
        sql.SQL(
            "INSERT INTO {t} AS s (slot_name, confirmed_commit_at, confirmed_lsn, updated_at,"
            " system_identifier) VALUES (%s, %s, %s::pg_lsn, now(), %s)"
            " ON CONFLICT (slot_name) DO UPDATE SET"
            " confirmed_commit_at = EXCLUDED.confirmed_commit_at,"
            " confirmed_lsn = EXCLUDED.confirmed_lsn, updated_at = now(),"
            " system_identifier = EXCLUDED.system_identifier"
            " WHERE s.confirmed_lsn IS NULL OR s.confirmed_lsn <= EXCLUDED.confirmed_lsn"
            " OR s.system_identifier IS DISTINCT FROM EXCLUDED.system_identifier"
        ).format(t=qualified(*table)),
        (slot, datetime.fromtimestamp(commit_time, UTC), format_lsn(lsn), system_identifier),
    )


@dataclass(frozen=True, slots=True)
class RelayHealth:
    """What the running relay last reported in its state row."""

    problem: str | None
    problem_since: datetime | None
    broker_blocked_since: datetime | None
    waiting_since: datetime | None
    heartbeat_at: datetime | None
    age: timedelta | None  # now() - heartbeat_at, by the server's clock

    @property
    def fresh(self) -> bool:
        """A relay wrote this recently: its problems are current, not a dead relay's."""
        return self.age is not None and self.age <= HEARTBEAT_STALE


def read_health(
    conn: psycopg.Connection[Any], table: tuple[str, str], slot: str
) -> RelayHealth | None:
    """The relay's last report, or None (no row, or a table from before these columns)."""
    if not exists(conn, table):
        return None
    present = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = ANY(%s)"
        " AND NOT attisdropped",
        (qualified(*table).as_string(conn), list(HEALTH_COLUMNS)),
    ).fetchone()
    if present is None or present[0] < len(HEALTH_COLUMNS):
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT problem, problem_since, broker_blocked_since, waiting_since, heartbeat_at,"
            " now() - heartbeat_at FROM {} WHERE slot_name = %s"
        ).format(qualified(*table)),
        (slot,),
    ).fetchone()
    return None if row is None else RelayHealth(*row)


def mark_resync(
    conn: psycopg.Connection[Any], table: tuple[str, str], slot: str, since: datetime | None
) -> None:
    """Set (a resync started from ``since``) or clear (None: it finished) the resync mark.

    While set, a healthy slot of that name is one an interrupted resync created,
    which the next ``resync`` may drop without losing anything.
    """
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} AS s (slot_name, resync_since) VALUES (%s, %s)"
            " ON CONFLICT (slot_name) DO UPDATE SET resync_since = EXCLUDED.resync_since"
        ).format(t=qualified(*table)),
        (slot, since),
    )


# (problem, problem_since, broker_blocked_since, waiting_since) as the relay sees them now.
Health = tuple[str | None, datetime | None, datetime | None, datetime | None]


class StateWriter:
    """The relay's throttled writer: at most one write per ``interval`` seconds.

    ``maybe_write`` is the relay's one call. A failed write (including a lost
    connection, reopened at the next write) is logged once, counted and retried
    at the next due time, and never raised: the state row is a convenience for
    ``resync`` and must never end a session.
    """

    def __init__(
        self,
        dsn: str,
        table: tuple[str, str],
        slot: str,
        interval: float = RECORD_INTERVAL,
        system_identifier: str | None = None,
    ) -> None:
        self._dsn = dsn
        self._table = table
        self._slot = slot
        self._system_identifier = system_identifier
        self._interval = interval
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._last = float("-inf")
        self._written_lsn = -1
        self.failures = 0
        self.reports_health = True
        self._health_written: Health | None = None
        self._health_last = float("-inf")

    def due(self, now: float, lsn: int) -> bool:
        """A newer LSN than the last one written, and ``interval`` since the last attempt."""
        return lsn > self._written_lsn and now - self._last >= self._interval

    async def maybe_write(
        self, now: float, commit_time: float | None, lsn: int, *, final: bool = False
    ) -> None:
        """Write if a commit is known, the LSN is newer and it is time (``final``: any time)."""
        if commit_time is None or lsn <= self._written_lsn:
            return
        if final or self.due(now, lsn):
            await self.write(now, commit_time, lsn)

    async def write(self, now: float, commit_time: float, lsn: int) -> bool:
        """Record the position; False (counted, the first failure logged) if it failed."""
        self._last = now
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await _connect(self._dsn)
            try:
                await record(
                    self._conn, self._table, self._slot, commit_time, lsn, self._system_identifier
                )
            except psycopg.errors.UndefinedColumn:  # a table older than system_identifier
                self._system_identifier = None
                await record(self._conn, self._table, self._slot, commit_time, lsn)
        except (psycopg.Error, OSError) as exc:
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "cannot record the relay position in %s (resync will need --since): %s",
                    ".".join(self._table),
                    one_line(str(exc)),
                )
            return False
        self._written_lsn = lsn
        return True

    async def maybe_report(self, now: float, health: Health) -> None:
        """Persist the relay's health when it changed, else as a heartbeat every ``interval``.

        A state table from before the health columns (no ``init`` since the
        upgrade) disables this once, with one warning: streaming goes on.
        """
        if not self.reports_health:
            return
        if health == self._health_written and now - self._health_last < self._interval:
            return
        self._health_last = now
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await _connect(self._dsn)
            await self._conn.execute(
                sql.SQL(
                    "INSERT INTO {t} AS s (slot_name, problem, problem_since,"
                    " broker_blocked_since, waiting_since, heartbeat_at)"
                    " VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (slot_name) DO UPDATE SET"
                    " problem = EXCLUDED.problem, problem_since = EXCLUDED.problem_since,"
                    " broker_blocked_since = EXCLUDED.broker_blocked_since,"
                    " waiting_since = EXCLUDED.waiting_since, heartbeat_at = now()"
                ).format(t=qualified(*self._table)),
                (self._slot, *health),
            )
        except psycopg.errors.UndefinedColumn:
            self.reports_health = False
            log.warning(
                "%s lacks the health columns: `cdc-relay status` cannot see this relay's "
                "problems until `cdc-relay init` adds them",
                ".".join(self._table),
            )
            return
        except (psycopg.Error, OSError) as exc:
            self.failures += 1
            if self.failures == 1:
                log.warning(
                    "cannot record the relay's health in %s: %s",
                    ".".join(self._table),
                    one_line(str(exc)),
                )
            return
        self._health_written = health

    async def retire(self) -> None:
        """A clean stop: no relay reports any more (``status`` must not hear a stopped one)."""
        if not self.reports_health or self._conn is None or self._conn.closed:
            return
        with contextlib.suppress(psycopg.Error, OSError):
            await self._conn.execute(
                sql.SQL(
                    "UPDATE {} SET problem = NULL, problem_since = NULL,"
                    " broker_blocked_since = NULL, waiting_since = NULL, heartbeat_at = NULL"
                    " WHERE slot_name = %s"
                ).format(qualified(*self._table)),
                (self._slot,),
            )

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, connect_timeout=10, application_name="cdc-relay state"
    )
    try:
        await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    except BaseException:
        await conn.close()
        raise
    return conn


# -- what to tell the operator when the slot is gone ------------------------------------

DEFAULT_MARGIN: Final = timedelta(minutes=15)
"""Subtracted from a recorded commit time: a transaction that committed after the
recorded one may have started (and stamped ``created_at``) up to this much earlier."""


def format_since(value: datetime) -> str:
    """A ``--since`` argument that parses back to no later than ``value`` (UTC, whole seconds)."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def lost_slot_hint(conn: psycopg.Connection[Any], settings: Settings) -> str:
    """The exact ``resync`` command for a lost slot, from the state row when there is one.

    For the messages about a missing or invalidated slot (``pg.checks.validate``, and
    the relay when START_REPLICATION fails with 42704/55000).
    """
    try:
        recorded = read(conn, table_name(settings), settings.slot)
    except psycopg.Error:
        recorded = None
    if recorded is not None and recorded.confirmed_commit_at is not None:
        slot = slot_option(settings)
        since = format_since(recorded.confirmed_commit_at - DEFAULT_MARGIN)
        return (
            f"the relay last confirmed a commit at {format_since(recorded.confirmed_commit_at)}; "
            f"run `cdc-relay resync{slot} --since {since}` to recreate the slot and send the "
            "outbox rows it missed"
        )
    return _generic_hint(settings)


def slot_option(settings: Settings) -> str:
    """`` --slot NAME`` for a command line, or nothing for the default slot."""
    return f" --slot {settings.slot}" if settings.slot != "cdc_relay" else ""


def _generic_hint(settings: Settings) -> str:
    return (
        f"run `cdc-relay resync{slot_option(settings)} --since TIMESTAMP` (when the relay last "
        "delivered) to recreate the slot and send the outbox rows it missed"
    )


def describe_lost_slot(settings: Settings) -> str:
    """``lost_slot_hint`` on a connection of its own; never raises (for the relay's error path)."""
    try:
        with psycopg.connect(settings.dsn, autocommit=True, connect_timeout=5) as conn:
            return lost_slot_hint(conn, settings)
    except (psycopg.Error, OSError):
        return _generic_hint(settings)

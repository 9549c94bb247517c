"""The dead-letter table: rows that can never be published, stored with the reason.

All dead-letter SQL lives here but the DDL (``cdc_relay.schema``): the table's
creation and migration by ``init``, the startup check, the relay's writer, and
what ``cdc-relay dead-letters list|prune`` do; ``dead-letters replay`` (which
publishes) is ``cdc_relay.replay``.
The relay moves the slot past a dead-lettered row only after ``write`` returned,
so a write that cannot finish must fail in bounded time (it ends the session and
the row comes again), never hang while ``/readyz`` says all is well.

What one dead letter stores is bounded (``bounded_row``): a text field of
``row_data`` over ``FIELD_LIMIT`` bytes (UTF-8) is replaced by an object
``{"prefix": <first PREFIX_CHARS characters>, "size": <bytes>, "sha256": <hex
of the UTF-8 text>}`` and its name is listed in ``row_data["truncated"]`` (e.g.
``["payload"]``, or ``["values[3]"]`` for an unreadable row). The outbox table
still holds the whole row, so a replay re-reads such a row from there by its id
or refuses it; it never publishes the prefix. A row the
server refuses to store all the same (a data error) is stored as ``{"unstorable":
<the error>}``, to be re-read from the outbox table likewise. The writer
sends rows as binary ``COPY`` data: no escaping, memory in proportion to what
is stored, so one row full of quotes or control characters cannot stall the
event loop or exhaust memory.

A dead-letter table that is missing or not writable ends the session like a
lock does; the relay retries with its backoff and heals once the grant or the
table is back (see ``DeadLettersUnwritable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, Final

import orjson
import psycopg
from psycopg import sql

from cdc_relay import schema
from cdc_relay.deadline import event_within
from cdc_relay.envelope import parse_timestamptz
from cdc_relay.errors import ConfigError, SessionError
from cdc_relay.letters import (  # noqa: F401 (re-exported: the writer's callers use them)
    FIELD_LIMIT,
    PREFIX_CHARS,
    REASON_CHARS,
    DeadLetter,
    PendingDeadLetter,
    bounded_row,
)
from cdc_relay.logbudget import LogBudget
from cdc_relay.logs import escape_controls
from cdc_relay.lsn import format_lsn
from cdc_relay.redact import one_line
from cdc_relay.schema import qualified

# Bounds for every statement of the relay's writer: a lock held on the table (a
# long ALTER, a forgotten transaction) fails the write instead of stalling it.
log = logging.getLogger("cdc_relay")

STATEMENT_TIMEOUT = 10.0
LOCK_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10
# Client-side margin over statement_timeout, for a server that cannot even answer.
CLIENT_MARGIN = 5.0
# The server refused what a row holds (SQLSTATE class 22, or 54: too complex/large).
REFUSED_DATA = (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded)


def create(conn: psycopg.Connection[Any], table: tuple[str, str]) -> list[str]:
    """Create the table, or migrate an old one (outbox_id uuid -> text); report lines."""
    name = ".".join(table)
    existed = _outbox_id_type(conn, table) is not None
    conn.execute(schema.dead_letter_ddl(table))
    report = [f"dead-letter table {name}: {'already exists' if existed else 'created'}"]
    if _outbox_id_type(conn, table) == "uuid":
        conn.execute(schema.dead_letter_outbox_id_to_text(table))
        report.append(f"dead-letter table {name}: migrated outbox_id from uuid to text")
    return report


def _outbox_id_type(conn: psycopg.Connection[Any], table: tuple[str, str]) -> str | None:
    """The type of outbox_id, or None when the table does not exist."""
    row = conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'outbox_id'"
        "  AND NOT a.attisdropped"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        table,
    ).fetchone()
    if row is None:
        return None
    return row[0] or "missing"


class DeadLettersUnwritable(ConfigError):
    """The dead-letter table is missing or this role cannot write it.

    At a first start it is a setting to fix: exit 78 at once. Once this process
    has seen the table writable (a relay that ran, a standby that checked before
    standing by), the relay retries it like a lock, with its backoff: a revoked
    grant or a dropped table is fixed while it runs, and nothing is lost meanwhile
    (the slot does not move past a row whose dead letter is not stored).
    """


def check_writable(conn: psycopg.Connection[Any], table: tuple[str, str]) -> None:
    """Raise DeadLettersUnwritable (one line) unless this role can store dead letters here."""
    name = ".".join(table)
    kind = _outbox_id_type(conn, table)
    if kind is None:
        raise DeadLettersUnwritable(
            f"dead-letter table {name} does not exist; run `cdc-relay init`"
        )
    if kind != "text":
        raise DeadLettersUnwritable(
            f"dead-letter table {name} has outbox_id {kind}, not text (a non-uuid id could not "
            "be stored); run `cdc-relay init` to migrate it"
        )
    # By OID, not by name: resolving a name already needs USAGE on the schema.
    row = conn.execute(
        "SELECT current_user, has_schema_privilege(n.oid, 'USAGE'),"
        " has_table_privilege(c.oid, 'INSERT'),"
        " coalesce((SELECT bool_and(has_sequence_privilege(d.objid, 'USAGE'))"
        "   FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        "   WHERE d.classid = 'pg_class'::regclass AND d.refobjid = c.oid), true)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        table,
    ).fetchone()
    assert row is not None
    user, schema_ok, insert_ok, sequence_ok = row
    missing = [
        what
        for what, ok in (
            (f"USAGE on schema {table[0]}", schema_ok),
            (f"INSERT on {name}", insert_ok),
            (f"USAGE on the sequence of {name}.id", sequence_ok),
        )
        if not ok
    ]
    if missing:
        raise DeadLettersUnwritable(
            f"role {user} cannot write dead letters: it lacks {', '.join(missing)}; "
            f"run `cdc-relay init --grant-to {user}` as an admin"
        )


COPY_CHUNK = 256 * 1024  # bytes of COPY data per write

# PGCOPY binary format: signature, flags, header extension length; a tuple is its
# field count, then each field's length (-1 for NULL) and bytes; -1 ends the data.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
_NULL = struct.pack("!i", -1)
_JSONB_VERSION = b"\x01"
_FIELD_COUNT = struct.pack("!h", 4)
_I32 = struct.Struct("!i")
_LSN_FIELD = struct.Struct("!iQ")  # its length (8), the LSN


def copy_tuple(letter: DeadLetter) -> bytes:
    """One dead letter as a binary COPY tuple: (outbox_id text, reason text, row_data jsonb,
    lsn pg_lsn). Binary, so nothing is escaped: the cost is the size of the data."""
    try:
        row = orjson.dumps(letter.row)
    except (TypeError, ValueError) as exc:  # never a crash loop over one odd value
        text = one_line(str(exc))[:200]
        row = orjson.dumps({"unserializable": f"{type(exc).__name__}: {text}"})
    outbox_id = letter.outbox_id
    reason = letter.reason.encode()
    return b"".join(
        (
            _FIELD_COUNT,
            _NULL if outbox_id is None else _text_field(outbox_id.encode()),
            _I32.pack(len(reason)),
            reason,
            _I32.pack(len(row) + 1),
            _JSONB_VERSION,
            row,
            _LSN_FIELD.pack(8, letter.lsn),
        )
    )


def _text_field(data: bytes) -> bytes:
    return _I32.pack(len(data)) + data


def _copy_statement(table: tuple[str, str]) -> sql.Composed:
    return sql.SQL("COPY {} (outbox_id, reason, row_data, lsn) FROM STDIN (FORMAT BINARY)").format(
        qualified(*table)
    )


class DeadLetterWriter:
    """The relay's one connection for dead letters: bounded statements, one round trip.

    With several outboxes on one slot, each outbox's rows go to its own
    dead-letter table (``by_outbox``: outbox table name -> dead-letter table,
    by ``DeadLetter.table``); anything else goes to ``table``, the first's.
    """

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        table: tuple[str, str],
        by_outbox: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self._conn = conn
        self._copy = _copy_statement(table)
        self._copies = {name: _copy_statement(t) for name, t in (by_outbox or {}).items()}

    @classmethod
    async def connect(
        cls,
        dsn: str,
        table: tuple[str, str],
        by_outbox: Mapping[str, tuple[str, str]] | None = None,
    ) -> DeadLetterWriter:
        """Connect with timeouts and keepalives so no write can wait forever."""
        conn = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            application_name="cdc-relay dead letters",
        )
        try:
            # SET, not the `options` keyword: that would replace options given in the DSN.
            await conn.execute(
                f"SET statement_timeout = {int(STATEMENT_TIMEOUT * 1000)};"
                f" SET lock_timeout = {int(LOCK_TIMEOUT * 1000)}"
            )
        except BaseException:
            await conn.close()
            raise
        return cls(conn, table, by_outbox)

    async def write(self, items: Sequence[DeadLetter]) -> None:
        """Store all items in one statement (one binary COPY, all or nothing).

        If the server refuses what a row holds (not the table, not the link), the
        items go one by one and a refused one is stored without its row: one odd
        row must not stop the stream for ever. Such a retry may store an item
        twice if the session ends half-way (at least once, like everything else).
        """
        if not items:
            return
        groups: dict[str, list[DeadLetter]] = {}  # by outbox table ("": the first's)
        if self._copies:  # several outboxes: one COPY per dead-letter table
            for letter in items:
                key = letter.table if letter.table in self._copies else ""
                groups.setdefault(key, []).append(letter)
        else:
            groups[""] = list(items)
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT + CLIENT_MARGIN):
                for key, letters in groups.items():
                    copy = self._copies[key] if key else self._copy
                    try:
                        await self._copy_in(copy, letters)
                    except REFUSED_DATA:
                        for letter in letters:
                            try:
                                await self._copy_in(copy, (letter,))
                            except REFUSED_DATA as exc:
                                await self._copy_in(copy, (letter.unstorable(exc),))
        except TimeoutError:
            await self.close()
            raise TimeoutError(
                f"dead-letter write got no answer in {STATEMENT_TIMEOUT + CLIENT_MARGIN:g}s"
            ) from None

    async def _copy_in(self, statement: sql.Composed, items: Sequence[DeadLetter]) -> None:
        """One binary COPY, its data written in chunks of about COPY_CHUNK bytes.

        A write per letter cost more CPU than building the letter (measured); a
        chunk bounds the memory a batch of large letters takes.
        """
        async with self._conn.cursor() as cur, cur.copy(statement) as copy:
            chunk = [_COPY_HEADER]
            size = 0
            for letter in items:
                data = copy_tuple(letter)
                chunk.append(data)
                size += len(data)
                if size >= COPY_CHUNK:
                    await copy.write(b"".join(chunk))
                    chunk.clear()
                    size = 0
            chunk.append(_COPY_TRAILER)
            await copy.write(b"".join(chunk))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close()


class DeadLetterWriteFailed(SessionError):
    """Storing dead letters failed (a lock, a timeout, a lost connection): the session ends."""


def write_failure(exc: BaseException) -> str:
    """One line for a failed dead-letter write: what happened and, if an operator can, the fix."""
    text = one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        fix = "grant it: run `cdc-relay init --grant-to <relay role>` as an admin; "
    elif isinstance(exc, psycopg.errors.UndefinedTable):
        fix = "create it: run `cdc-relay init`; "
    else:
        fix = ""
    return (
        f"cannot store dead letters ({type(exc).__name__}: {text}); {fix}"
        "retrying, nothing is lost: the rows are read again from the slot"
    )


class DeadLetterSink:
    """The session's one dead-letter worker: a bounded queue drained in batches.

    A burst of bad rows costs one connection and one round trip per batch, and
    the pump waits (``put``) while the queue is full, so memory stays bounded.
    The publisher's outcome callback cannot wait (``put_nowait``); what it adds
    is bounded by the in-flight window.
    """

    def __init__(
        self,
        writer: DeadLetterWriter,
        on_stored: Callable[[list[int]], None],
        *,
        limit: int = 1000,
        batch: int = 500,
        budget: LogBudget | None = None,
    ) -> None:
        self._writer = writer
        self._budget = budget or LogBudget()
        self._on_stored = on_stored
        self._limit = limit
        self._batch = batch
        self._queue: deque[PendingDeadLetter] = deque()
        self._waiting = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()

    def put_nowait(self, items: Iterable[PendingDeadLetter]) -> None:
        self._queue.extend(items)
        if self._queue:
            self._idle.clear()
            self._waiting.set()

    async def put(self, item: PendingDeadLetter) -> None:
        """Queue one dead letter; waits while the queue is full (back-pressure on the pump)."""
        self.put_nowait((item,))
        if len(self._queue) >= self._limit:
            self._room.clear()
            await self._room.wait()

    async def wait_idle(self) -> bool:
        """Until everything queued is stored (True), for a clean stop."""
        await self._idle.wait()
        return True

    async def run(self) -> None:
        """The worker task: store, log, report; a failed write raises (the session ends)."""
        queue, budget = self._queue, self._budget
        try:
            while True:
                due = budget.due(time.monotonic())
                if due is None:
                    await self._waiting.wait()
                else:  # letters not logged one by one: their summary line is due then
                    await event_within(self._waiting, due)
                self._waiting.clear()
                self._log_summary(budget.summary(time.monotonic()))
                while queue:
                    batch = [queue.popleft() for _ in range(min(len(queue), self._batch))]
                    try:
                        await self._writer.write([p.letter for p in batch])
                    except (psycopg.Error, OSError, TimeoutError) as exc:
                        raise DeadLetterWriteFailed(write_failure(exc)) from None
                    self._log_stored(batch)
                    self._on_stored([p.seq for p in batch])
                    if len(queue) < self._limit:
                        self._room.set()
                self._idle.set()
        finally:  # the session ends: what was stored and not logged is still said
            self._log_summary(budget.flush(time.monotonic()))

    def _log_stored(self, batch: list[PendingDeadLetter]) -> None:
        """A line per stored letter, within the log budget; the rest are counted for a summary."""
        budget, warning = self._budget, log.warning
        now = time.monotonic()
        for pending in batch:
            letter = pending.letter
            if not budget.take(now):
                budget.skip(letter.code)
                continue
            lsn = format_lsn(letter.lsn)
            warning(
                "dead-lettered outbox row %s (LSN %s): %s",
                letter.outbox_id,
                lsn,
                letter.reason,
                extra={"outbox_id": letter.outbox_id, "lsn": lsn, "reason": letter.code},
            )

    @staticmethod
    def _log_summary(summary: tuple[int, dict[str, int], float] | None) -> None:
        if summary is None:
            return
        count, by_reason, seconds = summary
        reasons = ", ".join(f"{code} {n}" for code, n in sorted(by_reason.items()))
        log.warning(
            "dead-lettered %d more outbox row(s) in the last %.0f s without a line each (%s): "
            "each is in the dead-letter table with its reason (`cdc-relay dead-letters list`)",
            count,
            seconds,
            reasons,
            extra={"dead_letters_not_logged": count},
        )


# -- operator commands ------------------------------------------------------------


@dataclass(slots=True)
class DeadLetterRecord:
    id: int
    outbox_id: str | None
    reason: str
    row_data: dict[str, Any]
    lsn: str
    created_at: str
    replayed_at: str | None


def _rfc3339(column: str) -> str:
    """A timestamptz column as RFC 3339 text in UTC, whatever the session's DateStyle/TimeZone."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"


RECORD_COLUMNS: Final = sql.SQL(
    "SELECT id, outbox_id, reason, row_data, lsn::text, "
    + _rfc3339("created_at")
    + ", "
    + _rfc3339("replayed_at")
)
"""The columns of a ``DeadLetterRecord``, in its order (times as RFC 3339)."""

LIST_HEADER: Final = ("id", "outbox_id", "created_at", "state", "reason")
"""The header row of ``dead-letters list`` (text), naming its tab-separated columns."""


def list_dead_letters(
    conn: psycopg.Connection[Any],
    table: tuple[str, str],
    *,
    include_replayed: bool = False,
    ids: Sequence[int] | None = None,
) -> list[DeadLetterRecord]:
    """Pending dead letters (all with include_replayed), oldest first; only ``ids`` if given."""
    conditions = []
    params: list[Any] = []
    if not include_replayed:
        conditions.append(sql.SQL("replayed_at IS NULL"))
    if ids is not None:
        conditions.append(sql.SQL("id = ANY(%s)"))
        params.append(list(ids))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    rows = conn.execute(
        sql.SQL("{} FROM {}{} ORDER BY id").format(RECORD_COLUMNS, qualified(*table), where),
        params,
    ).fetchall()
    return [DeadLetterRecord(*r) for r in rows]


def mark_replayed(conn: psycopg.Connection[Any], table: tuple[str, str], ids: list[int]) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET replayed_at = now() WHERE id = ANY(%s)").format(qualified(*table)),
        (ids,),
    )


def prune(
    conn: psycopg.Connection[Any],
    table: tuple[str, str],
    older_than: timedelta,
    *,
    include_pending: bool = False,
    batch: int = 1000,
) -> int:
    """Delete replayed (with include_pending: all) dead letters older than the retention.

    Small batches, each its own transaction, so a prune never holds many row locks
    or one long transaction (which would pin the xmin horizon).
    """
    pending = sql.SQL("") if include_pending else sql.SQL(" AND replayed_at IS NOT NULL")
    query = sql.SQL(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t}"
        " WHERE created_at < now() - %s{pending} ORDER BY id LIMIT %s)"
    ).format(t=qualified(*table), pending=pending)
    total = 0
    while True:
        deleted = conn.execute(query, (older_than, batch)).rowcount
        total += deleted
        if deleted < batch:
            return total


def record_as_json(record: DeadLetterRecord) -> bytes:
    """One dead letter as a JSON object: the row's payload and headers nested, times RFC 3339.

    A payload or headers that no longer parse (a stored row truncated to fit)
    stay a string; ``row.truncated`` names them.
    """
    row = dict(record.row_data)
    for key in ("payload", "headers"):
        if isinstance(row.get(key), str):
            with contextlib.suppress(orjson.JSONDecodeError):
                row[key] = orjson.loads(row[key])
    created = parse_timestamptz(row.get("created_at"))
    if created is not None:
        row["created_at"] = created.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return orjson.dumps(
        {
            "id": record.id,
            "outbox_id": record.outbox_id,
            "state": "replayed" if record.replayed_at else "pending",
            "created_at": record.created_at,
            "replayed_at": record.replayed_at,
            "reason": record.reason,
            "lsn": record.lsn,
            "row": row,
        }
    )


def record_as_text(record: DeadLetterRecord) -> str:
    """One tab-separated line under ``LIST_HEADER``; control characters escaped.

    A newline or tab in a reason must not forge a line or a column.
    """
    state = f"replayed {record.replayed_at}" if record.replayed_at else "pending"
    fields = (record.id, record.outbox_id or "-", record.created_at, state, record.reason)
    return "\t".join(escape_controls(str(field)) for field in fields)

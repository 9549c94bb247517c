"""The dead-letter table: rows that can never be published, stored with the reason.

All dead-letter SQL lives here but the DDL (``cdc_relay.schema``): the table's
creation and migration by ``init``, the startup check, the relay's writer,
and what ``cdc-relay dead-letters list|replay|prune`` do.
The relay moves the slot past a dead-lettered row only after ``write`` returned,
so a write that cannot finish must fail in bounded time (it ends the session and
the row comes again), never hang while ``/readyz`` says all is well.

Replay publishes with confirms and mandatory, under the router's one policy,
and marks a row replayed only after the broker confirmed it: a crash in between
replays it again (at least once, like the relay itself). Rows that still cannot
be routed stay pending, alone; one message per outbox row; one replay at a time.

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
import hashlib
import logging
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import psycopg
from psycopg import sql

from cdc_relay import schema
from cdc_relay.amqp import Outcome, Publisher, PublishFailed, UnpublishableMessage
from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError, RelayError
from cdc_relay.lsn import format_lsn
from cdc_relay.redact import one_line
from cdc_relay.router import Envelope, OutboxRow, Router, UnmappableRow
from cdc_relay.schema import qualified

# Bounds for every statement of the relay's writer: a lock held on the table (a
# long ALTER, a forgotten transaction) fails the write instead of stalling it.
log = logging.getLogger("cdc_relay")

STATEMENT_TIMEOUT = 10.0
LOCK_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10
# Client-side margin over statement_timeout, for a server that cannot even answer.
CLIENT_MARGIN = 5.0
# What one dead letter stores: a text field over FIELD_LIMIT bytes keeps its first
# PREFIX_CHARS characters, its size and its sha256 (the outbox table has the rest).
FIELD_LIMIT = 64 * 1024
PREFIX_CHARS = 1024
REASON_CHARS = 2000  # reasons come from us or the broker; a bound all the same
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


@dataclass(slots=True)
class DeadLetter:
    """One row that can never be published; what it stores is bounded on construction."""

    outbox_id: str | None
    reason: str
    row: dict[str, Any]
    lsn: int

    def __post_init__(self) -> None:
        if self.outbox_id is not None:
            self.outbox_id = _no_nul(self.outbox_id)
        reason = self.reason
        if len(reason) > REASON_CHARS:
            reason = reason[:REASON_CHARS] + "..."
        self.reason = _no_nul(reason)
        self.row = bounded_row(self.row)

    def unstorable(self, exc: BaseException) -> DeadLetter:
        """This dead letter without its row, for a row the server refuses to store.

        ``row_data`` is then ``{"unstorable": <the error>}``: the outbox table
        still holds the row; a replay cannot read it from here and says so.
        """
        primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
        text = one_line(primary or str(exc))[:500]
        return DeadLetter(
            self.outbox_id, self.reason, {"unstorable": f"{type(exc).__name__}: {text}"}, self.lsn
        )


def _no_nul(text: str) -> str:
    # Postgres text cannot hold NUL, and jsonb refuses the \u0000 escape.
    return text.replace("\x00", "\ufffd")


def bounded_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with each text field over FIELD_LIMIT bytes replaced (see the module docstring).

    Top-level text fields and the texts of top-level lists (an unreadable row's
    ``values``) are bounded; rows hold nothing deeper. NULs become U+FFFD.
    """
    truncated: list[str] = []
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, str):
            out[key] = _bounded_text(value, key, truncated)
        elif isinstance(value, list):
            out[key] = [
                _bounded_text(v, f"{key}[{i}]", truncated) if isinstance(v, str) else v
                for i, v in enumerate(value)
            ]
        else:
            out[key] = value
    if truncated:
        out["truncated"] = truncated
    return out


def _bounded_text(text: str, name: str, truncated: list[str]) -> Any:
    """The text itself (NUL-free), or its prefix, size and hash when it is over the bound."""
    if len(text) <= FIELD_LIMIT // 4:  # at most 4 bytes a character: surely within
        return _no_nul(text)
    data = text.encode("utf-8", "replace")
    if len(data) <= FIELD_LIMIT:
        return _no_nul(text)
    truncated.append(name)
    return {
        "prefix": _no_nul(text[:PREFIX_CHARS]),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# PGCOPY binary format: signature, flags, header extension length; a tuple is its
# field count, then each field's length (-1 for NULL) and bytes; -1 ends the data.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
_NULL = struct.pack("!i", -1)
_JSONB_VERSION = b"\x01"


def copy_tuple(letter: DeadLetter) -> bytes:
    """One dead letter as a binary COPY tuple: (outbox_id text, reason text, row_data jsonb,
    lsn pg_lsn). Binary, so nothing is escaped: the cost is the size of the data."""
    try:
        row = orjson.dumps(letter.row)
    except (TypeError, ValueError) as exc:  # never a crash loop over one odd value
        text = one_line(str(exc))[:200]
        row = orjson.dumps({"unserializable": f"{type(exc).__name__}: {text}"})
    fields = [
        None if letter.outbox_id is None else letter.outbox_id.encode(),
        letter.reason.encode(),
        _JSONB_VERSION + row,
        struct.pack("!Q", letter.lsn),
    ]
    parts = [struct.pack("!h", len(fields))]
    for field in fields:
        parts.append(_NULL if field is None else struct.pack("!i", len(field)) + field)
    return b"".join(parts)


class DeadLetterWriter:
    """The relay's one connection for dead letters: bounded statements, one round trip."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], table: tuple[str, str]) -> None:
        self._conn = conn
        self._copy = sql.SQL(
            "COPY {} (outbox_id, reason, row_data, lsn) FROM STDIN (FORMAT BINARY)"
        ).format(qualified(*table))

    @classmethod
    async def connect(cls, dsn: str, table: tuple[str, str]) -> DeadLetterWriter:
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
        return cls(conn, table)

    async def write(self, items: Sequence[DeadLetter]) -> None:
        """Store all items in one statement (one binary COPY, all or nothing).

        If the server refuses what a row holds (not the table, not the link), the
        items go one by one and a refused one is stored without its row: one odd
        row must not stop the stream for ever. Such a retry may store an item
        twice if the session ends half-way (at least once, like everything else).
        """
        if not items:
            return
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT + CLIENT_MARGIN):
                try:
                    await self._copy_in(items)
                except REFUSED_DATA:
                    for letter in items:
                        try:
                            await self._copy_in((letter,))
                        except REFUSED_DATA as exc:
                            await self._copy_in((letter.unstorable(exc),))
        except TimeoutError:
            await self.close()
            raise TimeoutError(
                f"dead-letter write got no answer in {STATEMENT_TIMEOUT + CLIENT_MARGIN:g}s"
            ) from None

    async def _copy_in(self, items: Sequence[DeadLetter]) -> None:
        async with self._conn.cursor() as cur, cur.copy(self._copy) as copy:
            await copy.write(_COPY_HEADER)
            for letter in items:
                await copy.write(copy_tuple(letter))
            await copy.write(_COPY_TRAILER)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close()


class DeadLetterWriteFailed(Exception):
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


@dataclass(slots=True)
class PendingDeadLetter:
    """A dead letter on its way to the table; its sequence number is confirmed once stored."""

    seq: int
    letter: DeadLetter


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
    ) -> None:
        self._writer = writer
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
        queue = self._queue
        while True:
            await self._waiting.wait()
            self._waiting.clear()
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), self._batch))]
                try:
                    await self._writer.write([p.letter for p in batch])
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    raise DeadLetterWriteFailed(write_failure(exc)) from None
                for pending in batch:
                    letter = pending.letter
                    log.warning(
                        "dead-lettered outbox row %s (LSN %s): %s",
                        letter.outbox_id,
                        format_lsn(letter.lsn),
                        letter.reason,
                        extra={"outbox_id": letter.outbox_id, "lsn": format_lsn(letter.lsn)},
                    )
                self._on_stored([p.seq for p in batch])
                if len(queue) < self._limit:
                    self._room.set()
            self._idle.set()


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
        sql.SQL(
            "SELECT id, outbox_id, reason, row_data, lsn::text, created_at::text,"
            " replayed_at::text FROM {}{} ORDER BY id"
        ).format(qualified(*table), where),
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


def row_from_record(record: DeadLetterRecord) -> OutboxRow:
    """The outbox row a dead letter stored, exactly as it was (UnmappableRow if it cannot be).

    A stored row whose ``truncated`` key names fields was cut to fit the table:
    publishing it would send a different message, so it is refused here and
    ``replay`` reads the row from the outbox instead.
    """
    data = record.row_data
    if "id" not in data:
        raise UnmappableRow("the stored row could not be read as an outbox row")
    truncated = data.get("truncated")
    if truncated:
        raise TruncatedRow(truncated)
    headers = data.get("headers")
    return OutboxRow(
        id=data["id"],
        aggregate_type=data["aggregate_type"],
        aggregate_id=data["aggregate_id"],
        event_type=data["event_type"],
        payload=data["payload"].encode(),
        headers=None if headers is None else headers.encode(),
        exchange=data.get("exchange"),
        routing_key=data.get("routing_key"),
        created_at=data.get("created_at"),
    )


class TruncatedRow(UnmappableRow):
    """The stored row lacks part of its fields (``truncated``); only the outbox has them."""

    def __init__(self, fields: Any) -> None:
        names = fields if isinstance(fields, list) else [fields]
        self.fields = [str(f) for f in names]
        super().__init__(f"the stored row has truncated field(s) {', '.join(self.fields)}")


class ReplayBusy(RelayError):
    """Another ``dead-letters replay`` holds this dead-letter table: wait for it, then retry."""

    exit_code = 1


# -- replay -----------------------------------------------------------------------------

REPLAY_BATCH = 500  # dead letters claimed, published and marked per round
# First key of replay's advisory lock (the second is the table's name): "cdcr".
REPLAY_LOCK_CLASS = 0x63646372


@dataclass(slots=True)
class ReplayGroup:
    """Pending dead letters of one outbox row: one message, and all of them marked replayed.

    ``lead`` is the one whose row is published: the oldest with a whole stored
    row, else the oldest (its row is then read from the outbox).
    """

    lead: DeadLetterRecord
    records: list[DeadLetterRecord]


def group_by_outbox_row(records: Iterable[DeadLetterRecord]) -> list[ReplayGroup]:
    """One group per outbox row, in the order of each group's oldest dead letter.

    The same outbox row may be dead-lettered more than once (in two sessions
    around a restart); publishing each copy would deliver it twice. A dead
    letter without an outbox id (an unreadable message) is a group of its own.
    """
    groups: dict[object, ReplayGroup] = {}
    for record in sorted(records, key=lambda r: r.id):
        key: object = record.id if record.outbox_id is None else record.outbox_id
        group = groups.get(key)
        if group is None:
            groups[key] = ReplayGroup(record, [record])
            continue
        group.records.append(record)
        if group.lead.row_data.get("truncated") and not record.row_data.get("truncated"):
            group.lead = record
    return list(groups.values())


def _claim(conn: psycopg.Connection[Any], table: tuple[str, str]) -> None:
    """Take the table's replay lock (a session advisory lock), or raise ReplayBusy.

    Two replays at once would both publish every row: the second one refuses in
    one line instead. The lock dies with the session, so a killed replay never
    leaves it behind.
    """
    name = ".".join(table)
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (REPLAY_LOCK_CLASS, name)
    ).fetchone()
    if row is not None and row[0]:
        return
    holder = conn.execute(
        "SELECT string_agg(pid::text, ', ') FROM pg_locks WHERE locktype = 'advisory'"
        " AND granted AND objsubid = 2 AND classid = %s::int::oid"
        " AND objid = hashtext(%s)::oid",
        (REPLAY_LOCK_CLASS, name),
    ).fetchone()
    pid = f" (pid {holder[0]})" if holder and holder[0] else ""
    raise ReplayBusy(
        f"another dead-letters replay is running on {name}{pid}; wait for it to finish, "
        "then run replay again for what it left pending"
    )


def _release(conn: psycopg.Connection[Any], table: tuple[str, str]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute(
            "SELECT pg_advisory_unlock(%s, hashtext(%s))", (REPLAY_LOCK_CLASS, ".".join(table))
        )


def _pending_after(
    conn: psycopg.Connection[Any],
    table: tuple[str, str],
    after: int,
    ids: Sequence[int] | None,
    limit: int,
) -> tuple[list[DeadLetterRecord], list[DeadLetterRecord]]:
    """The next pending dead letters by id, and the other pending ones of their outbox rows."""
    where = sql.SQL("replayed_at IS NULL AND id > %s")
    params: list[Any] = [after]
    if ids is not None:
        where += sql.SQL(" AND id = ANY(%s)")
        params.append(list(ids))
    columns = sql.SQL(
        "SELECT id, outbox_id, reason, row_data, lsn::text, created_at::text, replayed_at::text"
    )
    rows = conn.execute(
        sql.SQL("{} FROM {} WHERE {} ORDER BY id LIMIT %s").format(
            columns, qualified(*table), where
        ),
        [*params, limit],
    ).fetchall()
    records = [DeadLetterRecord(*r) for r in rows]
    outbox_ids = sorted({r.outbox_id for r in records if r.outbox_id is not None})
    if not outbox_ids:
        return records, []
    known = {r.id for r in records}
    siblings = conn.execute(
        sql.SQL("{} FROM {} WHERE replayed_at IS NULL AND outbox_id = ANY(%s)").format(
            columns, qualified(*table)
        ),
        (outbox_ids,),
    ).fetchall()
    return records, [DeadLetterRecord(*r) for r in siblings if r[0] not in known]


def _reread(
    conn: psycopg.Connection[Any],
    settings: Settings,
    truncated: TruncatedRow,
    outbox_id: str | None,
) -> OutboxRow:
    """The outbox row itself, for a dead letter whose stored copy was truncated."""
    table = ".".join(settings.table_parts)
    if outbox_id is None:
        raise UnmappableRow(f"{truncated} and no outbox id to read it again from {table}")
    try:
        values = conn.execute(
            sql.SQL(
                "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text,"
                " headers::text, exchange, routing_key, created_at::text FROM {}"
                " WHERE id = %s"
            ).format(qualified(*settings.table_parts)),
            (outbox_id,),
        ).fetchone()
    except psycopg.Error as exc:
        hint = ""
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            hint = "; run replay as a role that may SELECT it"
        raise UnmappableRow(
            f"{truncated}, and reading the row from {table} failed: "
            f"{one_line(str(exc)) or type(exc).__name__}{hint}"
        ) from None
    if values is None:
        raise UnmappableRow(f"{truncated}, and the row is no longer in {table} (pruned?)")
    id_, agg_type, agg_id, event_type, payload, headers, exchange, routing_key, created = values
    return OutboxRow(
        id_,
        agg_type,
        agg_id,
        event_type,
        payload.encode(),
        None if headers is None else headers.encode(),
        exchange,
        routing_key,
        created,
    )


class _Round:
    """What the broker said about the publishes since ``reset``, by the lead's id."""

    def __init__(self) -> None:
        self.outcomes: dict[int, str | None] = {}
        self.lost: PublishFailed | None = None

    def reset(self) -> None:
        self.outcomes = {}
        self.lost = None

    def on_outcome(self, outcome: Outcome) -> None:
        for seq in outcome.confirmed:
            self.outcomes[seq] = None
        for seq, error in outcome.failed:
            self.outcomes[seq] = error.reason
        if outcome.lost is not None and self.lost is None:
            self.lost = outcome.lost


async def replay(
    conn: psycopg.Connection[Any],
    settings: Settings,
    ids: list[int] | None = None,
    *,
    batch: int = REPLAY_BATCH,
) -> list[tuple[DeadLetterRecord, str | None]]:
    """Re-publish pending dead letters; returns (record, error or None) for each, by id.

    Converges: each outbox row is published once however many dead letters it
    has, and all of them are marked replayed once the broker confirmed it; a
    refused exchange (the policy, 404, 403) or an unmappable row fails only its
    own dead letters; one replay at a time per table (``ReplayBusy``); each
    round of ``batch`` is marked as soon as it is confirmed, so a second run
    after success publishes nothing. With ``ids``, the other pending dead
    letters of the same outbox rows are marked too: the row was delivered.
    """
    table = settings.dead_letter_table
    router = Router.from_settings(settings)
    _claim(conn, table)
    rounds = _Round()
    publisher = Publisher.from_settings(settings, rounds.on_outcome, max_in_flight=100)
    results: dict[int, tuple[DeadLetterRecord, str | None]] = {}
    refusals: dict[str, str | None] = {}  # exchange -> why the broker refuses it, or None
    interrupted: BaseException | None = None
    try:
        try:
            await publisher.connect()
        except Exception as exc:
            raise ConfigError(
                f"cannot connect to RabbitMQ ({type(exc).__name__}: {one_line(str(exc))}); "
                "check --amqp-url"
            ) from None
        after = 0
        while interrupted is None:
            primary, siblings = _pending_after(conn, table, after, ids, batch)
            if not primary:
                break
            after = primary[-1].id
            records = [r for r in primary + siblings if r.id not in results]
            settled, interrupted = await _replay_round(
                conn, settings, router, publisher, rounds, records, refusals
            )
            done: list[int] = []
            for group, error in settled:
                for record in group.records:
                    results[record.id] = (record, error)
                    if error is None:
                        done.append(record.id)
            if done:
                mark_replayed(conn, table, done)
    finally:
        await publisher.close()
        _release(conn, table)
    if interrupted is not None:
        confirmed = sum(error is None for _, error in results.values())
        raise ConfigError(
            f"replay interrupted ({type(interrupted).__name__}: {one_line(str(interrupted))}); "
            f"{confirmed} confirmed dead letter(s) were marked replayed, the rest stay pending"
        )
    return [results[k] for k in sorted(results)]


async def _replay_round(
    conn: psycopg.Connection[Any],
    settings: Settings,
    router: Router,
    publisher: Publisher,
    rounds: _Round,
    records: list[DeadLetterRecord],
    refusals: dict[str, str | None],
) -> tuple[list[tuple[ReplayGroup, str | None]], BaseException | None]:
    """Publish one message per outbox row of ``records``; each group's outcome.

    A publish the broker refuses by closing the channel (403, 404, 406) fails
    the group that caused it and every group bound for that exchange; the
    publisher reconnects and the unsettled rest is sent again. Anything else
    (a lost connection, no confirm) interrupts: the groups settled so far are
    returned with it, the others stay pending.
    """
    outcome: dict[int, str | None] = {}  # by the lead's id
    to_send: list[tuple[ReplayGroup, Envelope]] = []
    groups = group_by_outbox_row(records)
    for group in groups:
        lead = group.lead
        try:
            try:
                row = row_from_record(lead)
            except TruncatedRow as exc:
                row = _reread(conn, settings, exc, lead.outbox_id)
            to_send.append((group, router.route(row)))
        except (UnmappableRow, KeyError, AttributeError, TypeError) as exc:
            outcome[lead.id] = f"still not mappable: {exc}"
    interrupted: BaseException | None = None
    while to_send:
        rounds.reset()
        for group, envelope in to_send:
            seq = group.lead.id
            refused = await publisher.exchange_refusal(envelope.exchange, refusals)
            if refused is not None:
                outcome[seq] = refused
                continue
            try:
                await publisher.publish(seq, envelope)
            except UnpublishableMessage as exc:
                outcome[seq] = str(exc)
            except PublishFailed:
                break  # the channel is gone: rounds.lost says why
        confirmed = await publisher.wait_confirmed(settings.confirm_timeout)
        outcome.update(rounds.outcomes)
        lost = rounds.lost
        if confirmed and lost is None:
            break
        if lost is None or (lost.refused_exchange is None and lost.culprit_seq is None):
            interrupted = lost or PublishFailed(f"no confirm within {settings.confirm_timeout:g}s")
            break
        if lost.refused_exchange is not None:
            refusals[lost.refused_exchange] = (
                f"exchange {lost.refused_exchange!r} refused by the broker: {lost.reason}"
            )
        if lost.culprit_seq is not None:
            outcome[lost.culprit_seq] = lost.reason
        to_send = [(g, e) for g, e in to_send if g.lead.id not in outcome]
        try:
            await publisher.connect()
        except Exception as exc:
            interrupted = exc
            break
    settled = [(g, outcome[g.lead.id]) for g in groups if g.lead.id in outcome]
    return settled, interrupted


def record_as_json(record: DeadLetterRecord) -> bytes:
    return orjson.dumps(
        {
            "id": record.id,
            "outbox_id": record.outbox_id,
            "reason": record.reason,
            "lsn": record.lsn,
            "created_at": record.created_at,
            "replayed_at": record.replayed_at,
            "row": record.row_data,
        }
    )

"""Startup validation: every misconfiguration as one ConfigError line naming the fix.

A relay that streams nothing without saying why is the worst failure an
outbox can have, so ``validate`` checks the encoding, wal_level, the outbox's
columns, the publication, the emit function and key, and the slot before a
session starts, and returns what the session needs (``StartupFacts``). The
emit key is checked per message in the core (pure) because any role may call
``pg_logical_emit_message``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay import deadletters, resync_guard, state
from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError, SlotMissing
from cdc_relay.layout import Layout, build_layout
from cdc_relay.lsn import Lsn
from cdc_relay.pg.catalog import (
    SlotInfo,
    check_wal_level,
    missing_privilege,
    relation,
    slot_info,
    table_exists,
)
from cdc_relay.rows import TEXT_SELECT, OutboxRow, RowReader, row_from_text
from cdc_relay.schema import emit_key_table, function_names, qualified


@dataclass(frozen=True, slots=True)
class StartupFacts:
    """What validation learnt that the session needs (one representation each)."""

    outbox_relid: int  # the relation the publication covers: the outbox is this OID
    confirmed_flush_lsn: int  # where the slot resumes; the tracker never flushes below it
    # The key <table>_emit signs messages with; None: the outbox does not use emitted
    # messages, and the relay does not ask pgoutput for logical messages at all.
    emit_key: bytes | None = None
    # With several outboxes on the slot (``--config``): the OID of each, in file order.
    outbox_relids: tuple[int, ...] = ()


def validate(
    conn: psycopg.Connection[Any], settings: Settings, outboxes: Sequence[Settings] = ()
) -> StartupFacts:
    """Raise ConfigError for the first thing that would make the stream wrong or empty.

    ``outboxes`` (several outbox tables on one slot, ``settings`` the first) are
    each checked like the one outbox, and the publication must cover exactly them.
    """
    _check_encoding(conn)
    check_wal_level(conn)
    tables = [o.table_parts for o in outboxes] or [settings.table_parts]
    rel = check_outbox_table(conn, settings)
    if rel is None:
        if len(tables) > 1:
            raise ConfigError(_missing_table(settings))
        _check_tableless_publication(conn, settings)
        relid = 0  # table-less: only outbox_emit's messages, no relation is the outbox
    else:
        relid, relkind = rel
        _check_publication(conn, settings, relkind, tables)
    relids = [relid]
    for other in outboxes[1:]:
        other_rel = check_outbox_table(conn, other)
        if other_rel is None:
            raise ConfigError(_missing_table(other))
        _check_publication(conn, other, other_rel[1], tables)
        deadletters.check_writable(conn, other.dead_letter_table)
        relids.append(other_rel[0])
    _check_emit_prefix(conn, settings)
    emit_key = read_emit_key(conn, settings, tableless=rel is None)
    # Before the slot: a resync under way has no slot (or an idle new one) for a while.
    unreadable = resync_guard.check_no_resync(conn, settings)
    info = slot_info(conn, settings.slot)
    _check_slot(conn, settings, info)
    assert info is not None
    deadletters.check_writable(conn, settings.dead_letter_table)
    if unreadable is not None:
        raise unreadable
    return StartupFacts(
        outbox_relid=relid,
        confirmed_flush_lsn=int(Lsn.parse(info.confirmed_flush_lsn or "0/0")),
        emit_key=emit_key,
        outbox_relids=tuple(relids),
    )


def _missing_table(settings: Settings) -> str:
    schema, table = settings.table_parts
    return (
        f"outbox table {schema}.{table} does not exist; run `cdc-relay init --config ...` "
        "(each [[outbox]] of a file needs its table)"
    )


EMIT_KEY_SIZE: Final = 64  # bytes: one SHA-256 block, so HMAC uses the key as it is


def read_emit_key(
    conn: psycopg.Connection[Any], settings: Settings, *, tableless: bool = False
) -> bytes | None:
    """The emit key, or None when the outbox does not use emitted messages.

    An emit function of an older cdc-relay (EXECUTE for PUBLIC, unsigned
    messages) is refused rather than ignored: its messages would be lost
    silently, and publishing them would let any role publish anything.
    """
    if unsigned_emit_function(conn, settings) is not None:
        raise ConfigError(unsigned_emit_hint(settings))
    keys = emit_key_table(settings.table_parts)
    name = ".".join(keys)
    if not table_exists(conn, *keys):
        if tableless:
            raise ConfigError(
                f"table-less outbox without its emit key table {name}: run "
                "`cdc-relay init --no-table --grant-emit-to ROLE` (the roles that emit)"
            )
        return None
    try:
        row = conn.execute(sql.SQL("SELECT key FROM {}").format(qualified(*keys))).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigError(
            missing_privilege(conn, f"SELECT on {name}, the key emitted messages are checked with")
        ) from None
    if row is None or len(row[0]) != EMIT_KEY_SIZE:
        raise ConfigError(f"emit key table {name} holds no valid key: run `cdc-relay init --emit`")
    return bytes(row[0])


def _emit_sources(conn: psycopg.Connection[Any], settings: Settings) -> tuple[str, list[str]]:
    """``<table>_emit``'s qualified name and the source of each function of that name."""
    schema = settings.table_parts[0]
    emit = function_names(settings.table_parts)[1]
    rows = conn.execute(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s AND p.proname = %s",
        (schema, emit),
    ).fetchall()
    return f"{schema}.{emit}", [source for (source,) in rows]


def unsigned_emit_function(conn: psycopg.Connection[Any], settings: Settings) -> str | None:
    """The name of an init-written ``<table>_emit`` that does not sign its messages, if any."""
    name, sources = _emit_sources(conn, settings)
    unsigned = [s for s in sources if _EMIT_PREFIX.search(s) and "sha256(" not in s]
    return name if unsigned else None


def unsigned_emit_hint(settings: Settings) -> str:
    schema = settings.table_parts[0]
    emit = function_names(settings.table_parts)[1]
    return (
        f"{schema}.{emit} is the emit function of an older cdc-relay (any role may call it, "
        "its messages are not signed), so the relay no longer publishes its messages: run "
        "`cdc-relay init --grant-emit-to ROLE` (the roles that emit) to replace it, or "
        f"DROP FUNCTION {schema}.{emit} if nothing emits"
    )


_EMIT_PREFIX = re.compile(r"pg_logical_emit_message\(\s*true\s*,\s*'((?:[^']|'')*)'")


def _check_emit_prefix(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """``<table>_emit`` must write the prefix this relay publishes, or its messages go nowhere.

    A function init did not write (no recognisable emit call) is the user's own: not checked.
    """
    emit, sources = _emit_sources(conn, settings)
    calls = (m for source in sources for m in _EMIT_PREFIX.finditer(source))
    prefixes = {m.group(1).replace("''", "'") for m in calls}
    if prefixes and settings.message_prefix not in prefixes:
        written = sorted(prefixes)[0]
        raise ConfigError(
            f"{emit} writes messages with prefix {written!r} but --message-prefix is "
            f"{settings.message_prefix!r}, so its messages would never be published: run with "
            f"--message-prefix {written}, or run `cdc-relay init --message-prefix "
            f"{settings.message_prefix}` to rewrite the function"
        )


def check_outbox_table(conn: psycopg.Connection[Any], settings: Settings) -> tuple[int, str] | None:
    """(oid, relkind) of the outbox after checking its columns, or None when there is no table."""
    schema, table = settings.table_parts
    rel = relation(conn, schema, table)
    if rel is not None:
        check_columns(conn, rel[0], f"{schema}.{table}", layout_of(settings))
    return rel


def layout_of(settings: Settings) -> Layout:
    """The settings' column mapping (Settings.check has refused a bad one already)."""
    try:
        return build_layout(settings.layout, settings.column, settings.header_column)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TextRows:
    """How ``resync`` and ``replay`` select outbox rows as text and read them, per the layout.

    ``select`` lists the columns (each ``::text``, as the stream carries them);
    ``read`` makes the row from one selected tuple; ``created_at`` and ``id``
    are the columns those fields live in (None: the table has no such column).
    """

    select: sql.Composable
    read: Callable[[tuple[Any, ...]], OutboxRow]
    created_at: sql.Identifier | None
    id: sql.Identifier


def text_rows(conn: psycopg.Connection[Any], settings: Settings) -> TextRows:
    """The columns to select for the settings' layout, read as the stream would read them."""
    layout = layout_of(settings)
    if layout.is_default:
        return TextRows(
            sql.SQL(TEXT_SELECT), row_from_text, sql.Identifier("created_at"), sql.Identifier("id")
        )
    rel = relation(conn, *settings.table_parts)
    if rel is None:
        raise ConfigError(f"outbox table {'.'.join(settings.table_parts)} does not exist")
    wanted = {c for _, c in layout.columns} | {c for c, _ in layout.header_columns}
    chosen = [(name, oid) for name, _, _, oid in table_columns(conn, rel[0]) if name in wanted]
    names = [name for name, _ in chosen]
    reader = RowReader(names, layout, [oid for _, oid in chosen])

    def read(values: tuple[Any, ...]) -> OutboxRow:
        return reader.read(tuple(None if v is None else v.encode() for v in values))

    created = layout.column_of("created_at")
    return TextRows(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in names),
        read,
        sql.Identifier(created) if created in names else None,
        sql.Identifier(layout.column_of("id") or "id"),
    )


def table_columns(conn: psycopg.Connection[Any], relid: int) -> list[tuple[str, str, bool, int]]:
    """(name, base type name, generated, type OID) of each column, in table order.

    A domain counts as its base type, which is what its values look like on the wire.
    """
    return conn.execute(
        "SELECT a.attname, b.typname, a.attgenerated <> '', a.atttypid::int"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END"
        " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (relid,),
    ).fetchall()


def _check_tableless_publication(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """No outbox table: valid only with an empty publication (``init --no-table``).

    A publication that covers some other table, or all tables, means the
    outbox table is missing rather than deliberately absent.
    """
    schema, table = settings.table_parts
    missing = (
        f"outbox table {schema}.{table} does not exist; run `cdc-relay init` "
        "(or create it from `cdc-relay init --print-sql`) or fix --table"
    )
    pub = conn.execute(
        "SELECT puballtables, pubinsert FROM pg_publication WHERE pubname = %s",
        (settings.publication,),
    ).fetchone()
    if pub is None:
        raise ConfigError(
            f"{missing}; for a table-less outbox (outbox_emit only) run `cdc-relay init --no-table`"
        )
    covered = conn.execute(
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s", (settings.publication,)
    ).fetchone()
    if pub[0] or (covered is not None and covered[0] > 0):
        raise ConfigError(missing)


def _check_encoding(conn: psycopg.Connection[Any]) -> None:
    """pgoutput sends text in the server encoding; the relay reads it as UTF-8."""
    row = conn.execute("SHOW server_encoding").fetchone()
    encoding = row[0] if row else "unknown"
    if isinstance(encoding, bytes):  # psycopg returns bytes in a SQL_ASCII database
        encoding = encoding.decode("ascii", "replace")
    if encoding.upper().replace("-", "") != "UTF8":
        raise ConfigError(
            f"database {conn.info.dbname} uses server encoding {encoding}; the relay needs "
            "UTF8 (create the database WITH ENCODING 'UTF8')"
        )


def check_columns(conn: psycopg.Connection[Any], relid: int, name: str, layout: Layout) -> None:
    """Every column the layout reads, by name (types too for a mapped layout).

    A renamed optional column would silently vanish. A generated column
    (``GENERATED ALWAYS AS (...)``) is refused too: pgoutput leaves generated
    columns out of every row, so a generated ``routing_key`` passed this check
    and was silently ignored.
    """
    rows = table_columns(conn, relid)
    types = {r[0]: r[1] for r in rows}
    generated = [r[0] for r in rows if r[2]]
    if layout.is_default:
        missing = [c for c, _ in layout.expected_columns() if c not in types]
        if missing:
            raise ConfigError(
                f"outbox table {name} lacks column(s) {', '.join(missing)} (renamed or "
                "dropped?); the relay needs every column of `cdc-relay init --print-sql`, "
                "or --layout/--column naming your columns"
            )
    try:
        layout.check_table(name, types, generated)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_publication(
    conn: psycopg.Connection[Any],
    settings: Settings,
    relkind: str,
    tables: Sequence[tuple[str, str]] = (),
) -> None:
    """The publication covers this outbox, inserts only, and no table but ``tables``."""
    schema, table = settings.table_parts
    tables = list(tables) or [(schema, table)]
    all_names = ", ".join(".".join(t) for t in tables)
    pub = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables, pubviaroot"
        " FROM pg_publication WHERE pubname = %s",
        (settings.publication,),
    ).fetchone()
    if pub is None:
        raise ConfigError(
            f"publication {settings.publication} does not exist; run `cdc-relay init` "
            "or fix --publication"
        )
    pubinsert, pubupdate, pubdelete, pubtruncate, puballtables, pubviaroot = pub
    if relkind == "p" and not pubviaroot:
        raise ConfigError(
            f"outbox {schema}.{table} is partitioned but publication {settings.publication} "
            "publishes per partition (renames would be lost): ALTER PUBLICATION "
            f"{settings.publication} SET (publish_via_partition_root = true)"
        )
    covered = conn.execute(
        "SELECT rowfilter IS NOT NULL, attnames FROM pg_publication_tables"
        " WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (settings.publication, schema, table),
    ).fetchone()
    if covered is None:
        raise ConfigError(
            f"publication {settings.publication} does not cover {schema}.{table}; "
            f"run ALTER PUBLICATION {settings.publication} ADD TABLE {schema}.{table}"
        )
    if puballtables:
        raise ConfigError(
            f"publication {settings.publication} is FOR ALL TABLES; the relay needs one "
            f"limited to {all_names}: drop it and run `cdc-relay init`"
        )
    covered_tables = conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
        (settings.publication,),
    ).fetchall()
    others = [f"{r[0]}.{r[1]}" for r in covered_tables if (r[0], r[1]) not in tables]
    if others:
        names = ", ".join(sorted(others))
        raise ConfigError(
            f"publication {settings.publication} also covers {names}; it must cover only "
            f"{all_names}: ALTER PUBLICATION {settings.publication} DROP TABLE {names}"
        )
    if not pubinsert or pubupdate or pubdelete or pubtruncate:
        raise ConfigError(
            f"publication {settings.publication} must publish inserts only: "
            f"ALTER PUBLICATION {settings.publication} SET (publish = 'insert')"
        )
    has_filter, attnames = covered
    missing = [
        c
        for c, _ in layout_of(settings).expected_columns()
        if attnames is not None and c not in attnames
    ]
    if has_filter or missing:
        raise ConfigError(
            f"publication {settings.publication} has a row filter or column list on "
            f"{schema}.{table} (rows or columns would be skipped silently): "
            f"ALTER PUBLICATION {settings.publication} SET TABLE {schema}.{table}"
        )


async def look_at_outbox(
    conn: psycopg.AsyncConnection[Any], settings: Settings
) -> tuple[int | None, bool]:
    """(the OID now named like the outbox or None, whether the publication covers it).

    The relay's drift check (``health.judge_drift``) asks this every few seconds;
    pg_publication_tables also answers for FOR ALL TABLES and partition roots.
    """
    schema, table = settings.table_parts
    cur = await conn.execute(
        "SELECT (SELECT c.oid::bigint FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
        " AND c.relkind IN ('r', 'p')), EXISTS (SELECT 1 FROM pg_publication_tables"
        " WHERE pubname = %s AND schemaname = %s AND tablename = %s)",
        (schema, table, settings.publication, schema, table),
    )
    row = await cur.fetchone()
    assert row is not None
    return (None if row[0] is None else int(row[0])), bool(row[1])


def _check_slot(conn: psycopg.Connection[Any], settings: Settings, info: SlotInfo | None) -> None:
    if info is None:
        raise SlotMissing(
            f"replication slot {settings.slot} does not exist; if it was lost or dropped, "
            f"{state.lost_slot_hint(conn, settings)}; for a new setup run `cdc-relay init`, "
            "or fix --slot"
        )
    if info.slot_type != "logical" or info.plugin != "pgoutput":
        raise ConfigError(
            f"replication slot {settings.slot} uses plugin {info.plugin!r} ({info.slot_type}); "
            f"the relay needs a logical pgoutput slot: `cdc-relay drop` then `cdc-relay init`"
        )
    dbname = conn.info.dbname
    if info.database != dbname:
        raise ConfigError(
            f"replication slot {settings.slot} belongs to database {info.database!r}, "
            f"not {dbname!r}; fix --dsn or --slot"
        )
    if info.two_phase:
        raise ConfigError(
            f"replication slot {settings.slot} was created with two_phase (prepared "
            "transactions would be decoded before they commit): `cdc-relay drop` then "
            "`cdc-relay init`"
        )
    if info.wal_status == "lost":
        raise ConfigError(
            f"replication slot {settings.slot} was invalidated (WAL removed, wal_status=lost); "
            f"rows may have been missed: {state.lost_slot_hint(conn, settings)}"
        )

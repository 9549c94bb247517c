"""Set up, check, inspect and remove the Postgres side: table, publication, slot.

All of it uses an ordinary (non-replication) connection. Validation turns each
misconfiguration into one ConfigError line naming the fix, because a relay
that streams nothing without saying why is the worst failure an outbox can have.
The DDL is package data (``cdc_relay/sql/*.sql``), read here and nowhere else;
the dead-letter table's DDL belongs to ``cdc_relay.deadletters``.

Emitted messages (``<table>_emit``) have the outbox table's trust boundary.
The existence of ``<table>_emit_key`` records that an outbox uses them: the
relay must read that key anyway to check each message's HMAC, so one fact
decides both whether ``run`` asks pgoutput for logical messages and what it
accepts; a flag elsewhere could disagree with it. The key is checked in the
core (pure) because any role may call ``pg_logical_emit_message``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib.resources import files
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay import deadletters, inbox, state
from cdc_relay.config import DEFAULT_MESSAGE_PREFIX, Settings
from cdc_relay.deadline import event_within
from cdc_relay.errors import ConfigError, SlotMissing
from cdc_relay.lsn import Lsn
from cdc_relay.pg.slotwait import SlotCreationWatch
from cdc_relay.redact import Redactor, one_line
from cdc_relay.rows import OUTBOX_COLUMNS

log = logging.getLogger("cdc_relay")


def qualified(schema: str, table: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def _template(name: str) -> str:
    return (files("cdc_relay") / "sql" / name).read_text(encoding="utf-8")


def outbox_ddl(table: tuple[str, str]) -> sql.Composed:
    """CREATE TABLE IF NOT EXISTS for the outbox (package data cdc_relay/sql/outbox.sql)."""
    return sql.SQL(_template("outbox.sql")).format(outbox=qualified(*table))


def function_names(table: tuple[str, str]) -> tuple[str, str]:
    """(enqueue, emit) function names for an outbox: ``outbox_enqueue`` for ``outbox``.

    Named after the table, so that two outboxes in one schema never redirect each
    other's enqueue calls; the default table gets exactly ``outbox_enqueue``/``outbox_emit``.
    """
    prefix = table[1][:55]  # + "_enqueue" stays within Postgres' 63-byte names
    return f"{prefix}_enqueue", f"{prefix}_emit"


def emit_key_table(table: tuple[str, str]) -> tuple[str, str]:
    """``<table>_emit_key`` next to the outbox: the key emitted messages are signed with.

    Its existence is how ``init`` records "this outbox uses emitted messages":
    ``run`` asks pgoutput for logical messages only then (one fact, in the
    database, that the relay must read anyway to check the signatures).
    """
    return table[0], f"{table[1][:50]}_emit_key"


def enqueue_function_ddl(table: tuple[str, str]) -> sql.Composed:
    """``<table>_enqueue`` (package data cdc_relay/sql/functions.sql)."""
    enqueue = function_names(table)[0]
    return sql.SQL(_template("functions.sql")).format(
        outbox=qualified(*table), enqueue=qualified(table[0], enqueue)
    )


def emit_function_ddl(table: tuple[str, str], prefix: str = DEFAULT_MESSAGE_PREFIX) -> sql.Composed:
    """The emit key table and ``<table>_emit`` (signing, SECURITY DEFINER, no PUBLIC EXECUTE).

    Each outbox of a database needs its own prefix: every slot decodes every
    logical message, and a relay publishes those with its --message-prefix.
    """
    emit = function_names(table)[1]
    return sql.SQL(_template("emit.sql")).format(
        keys=qualified(*emit_key_table(table)),
        emit=qualified(table[0], emit),
        prefix=sql.Literal(prefix),
    )


def functions_ddl(table: tuple[str, str], prefix: str = DEFAULT_MESSAGE_PREFIX) -> sql.Composed:
    """Both application functions: enqueue, then the emit key table and emit."""
    return sql.Composed([enqueue_function_ddl(table), emit_function_ddl(table, prefix)])


# Kept for bench/polling.py: the outbox DDL as a psycopg template with {table}.
OUTBOX_DDL = _template("outbox.sql").replace("{outbox}", "{table}")


def _create_inbox(conn: psycopg.Connection[Any]) -> str:
    """The processed-messages table of ``cdc_relay.inbox`` (consumers dedupe with it)."""
    schema, name = inbox.DEFAULT_TABLE.split(".")
    existed = table_exists(conn, schema, name)
    conn.execute(inbox.ddl(inbox.DEFAULT_TABLE))  # type: ignore[arg-type]
    state_word = "already exists" if existed else "created"
    return f"table {inbox.DEFAULT_TABLE}: {state_word} (for idempotent consumers)"


def render_sql(settings: Settings) -> str:
    """Everything ``init`` creates in SQL, as one script (``init --print-sql``)."""
    table, dl_table = settings.table_parts, settings.dead_letter_table
    header = (
        "-- Generated by `cdc-relay init --print-sql` for --table "
        f"{'.'.join(table)}; do not edit.\n"
        "-- Apply it from your migrations and run `cdc-relay init --no-table` if you prefer.\n\n"
    )
    parts = [
        outbox_ddl(table),
        deadletters.ddl(dl_table),
        state.ddl(state.table_name(settings)),
        enqueue_function_ddl(table),
    ]
    emit_fn = ".".join((table[0], function_names(table)[1]))
    emit_part = (
        "-- Only for emitted messages (outbox_emit): leave this part out unless the application\n"
        "-- emits; the relay asks for logical messages only when the key table exists. Then\n"
        f"-- GRANT EXECUTE ON FUNCTION {emit_fn} TO <the roles that emit>, and SELECT on the\n"
        "-- key table to the relay's role (what `init --grant-emit-to/--grant-to` do).\n"
    )
    emit_part += emit_function_ddl(table, settings.message_prefix).as_string(None).strip() + "\n"
    inbox_part = "-- For idempotent consumers (cdc_relay.inbox.once): the ids they processed.\n"
    inbox_part += inbox.ddl(inbox.DEFAULT_TABLE)
    texts = [p.as_string(None).strip() + "\n" for p in parts]
    return header + "\n".join([*texts, emit_part, inbox_part])


# The CLI's bounds for commands that only read (``status``, ``dead-letters list``): a
# table locked by a VACUUM FULL or a migration makes them answer, not queue behind it
# (measured before: `status` still waiting after 90 s, its query queued after the kill).
READ_STATEMENT_TIMEOUT: Final = 10.0
READ_LOCK_TIMEOUT: Final = 5.0
# Commands that change little at a time (drop, prune, dead-letters replay/prune): the
# same lock bound, and statements that may run longer. Not init or resync: creating a
# slot waits for every running transaction, which a lock timeout would turn into a failure.
WRITE_STATEMENT_TIMEOUT: Final = 60.0


def connect(
    dsn: str,
    *,
    statement_timeout: float | None = None,
    lock_timeout: float | None = None,
    **kwargs: Any,
) -> psycopg.Connection[Any]:
    """An autocommit admin connection; a failure is one ConfigError line, never the DSN.

    With timeouts (seconds) every statement ends within them on the server too,
    so a killed client leaves no query queued behind a lock.
    """
    redact = Redactor([dsn])
    try:
        conn = psycopg.connect(dsn, autocommit=True, **{"connect_timeout": 10, **kwargs})
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
        raise ConfigError(
            f"cannot connect to Postgres ({redact(one_line(str(exc)) or repr(exc))}); check --dsn"
        ) from None
    for name, value in (("statement_timeout", statement_timeout), ("lock_timeout", lock_timeout)):
        if value is not None:
            conn.execute(sql.SQL("SET {} = {}").format(sql.SQL(name), int(value * 1000)))
    return conn


TIMEOUT_ERRORS: Final = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)


def could_not_read(what: str, exc: psycopg.Error) -> str:
    """One line for a read that hit a lock or statement timeout (a lock held by DDL?)."""
    why = "it is locked" if isinstance(exc, psycopg.errors.LockNotAvailable) else "it timed out"
    return (
        f"could not read {what}: {why} ({exc.diag.message_primary or one_line(str(exc))}); "
        "a VACUUM FULL, a migration "
        "or another long lock holds it (see pg_locks)"
    )


def _exists(conn: psycopg.Connection[Any], query: str, *params: Any) -> bool:
    return conn.execute(query, params).fetchone() is not None


def table_exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    return _relation(conn, schema, table) is not None


def _relation(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[int, str] | None:
    """(oid, relkind) of a table or partitioned table, or None."""
    row = conn.execute(
        "SELECT c.oid::bigint, c.relkind::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, table),
    ).fetchone()
    return None if row is None else (int(row[0]), row[1])


def init(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    create_table: bool = True,
    grant_to: str | None = None,
    failover: bool = False,
    emit: bool = False,
    grant_emit_to: Sequence[str] = (),
    progress: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """Create what is missing; return one line per object saying created or already there.

    ``progress`` gets a line every few seconds while the slot's creation waits
    for older transactions to end (``pg.slotwait``).

    With ``failover`` the slot is created as a failover slot (PostgreSQL 17+), which
    a standby with ``sync_replication_slots`` keeps a copy of (see docs/ha.md).
    The emit function and its key exist only where asked (``emit``, ``grant_emit_to``),
    for a table-less outbox, or where they already are: the relay asks for
    logical messages only then, and only ``grant_emit_to`` roles may call it.
    """
    settings.check()  # e.g. an invalid slot name, before anything is created
    check_wal_level(conn)
    if failover:
        check_failover_supported(conn)
    report: list[str] = []
    schema, table = settings.table_parts
    tableless = not create_table and not table_exists(conn, schema, table)
    if create_table:
        existed = table_exists(conn, schema, table)
        conn.execute(outbox_ddl((schema, table)))
        report.append(f"table {schema}.{table}: {'already exists' if existed else 'created'}")
    elif tableless:
        report.append(
            f"table {schema}.{table}: none (table-less outbox: publish with "
            f"{function_names((schema, table))[1]}; create the table from "
            "`cdc-relay init --print-sql` to use rows too)"
        )
    report += deadletters.create(conn, settings.dead_letter_table)
    report += state.create(conn, state.table_name(settings))
    report.append(_create_inbox(conn))
    keys = emit_key_table((schema, table))
    enqueue_name, emit_name = function_names((schema, table))
    use_emit = emit or bool(grant_emit_to) or tableless or table_exists(conn, *keys)
    if not tableless:
        enqueue = enqueue_function_ddl((schema, table))
        report += _create_functions(conn, (schema, table), enqueue, enqueue_name)
    if use_emit:
        existed = table_exists(conn, *keys)
        emit_ddl = emit_function_ddl((schema, table), settings.message_prefix)
        report += _create_functions(conn, (schema, table), emit_ddl, emit_name)
        report.append(
            f"emit key table {'.'.join(keys)}: {'already exists' if existed else 'created'}"
            " (readable only by its owner and the relay's role)"
        )
    elif _unsigned_emit_function(conn, settings) is not None:
        report.append(f"warning: {_unsigned_emit_hint(settings)}")

    if _exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", settings.publication):
        report.append(_cover_outbox(conn, settings, tableless))
    elif tableless:
        # Empty: pgoutput still sends logical messages, and validation accepts it.
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} WITH (publish = 'insert')").format(
                sql.Identifier(settings.publication)
            )
        )
        report.append(f"publication {settings.publication}: created (no table: messages only)")
    else:
        rel = _relation(conn, schema, table)
        # A partitioned outbox is published as its root, so renames cannot hide rows.
        via_root = ", publish_via_partition_root = true" if rel and rel[1] == "p" else ""
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert'{})").format(
                sql.Identifier(settings.publication), qualified(schema, table), sql.SQL(via_root)
            )
        )
        report.append(f"publication {settings.publication}: created (inserts of {schema}.{table})")

    with SlotCreationWatch(
        settings.dsn,
        f"init: creating replication slot {settings.slot}",
        progress,
        exclude_pid=conn.info.backend_pid,
    ):
        report.append(_create_slot(conn, settings.slot, failover=failover))
    if grant_to is not None:
        report += grant(conn, settings, grant_to)
    for role in grant_emit_to:
        report += grant_emit(conn, settings, role)
    return report


def _cover_outbox(conn: psycopg.Connection[Any], settings: Settings, tableless: bool) -> str:
    """An existing publication made to cover the outbox; its one report line.

    A dropped and recreated outbox leaves the publication without it (Postgres
    removes a dropped table from its publications), and its rows would then be
    skipped without a word: init adds it back, or names the statement to run.
    """
    pub, (schema, table) = settings.publication, settings.table_parts
    if tableless or _exists(
        conn,
        "SELECT 1 FROM pg_publication_tables WHERE pubname = %s"
        " AND schemaname = %s AND tablename = %s",
        pub,
        schema,
        table,
    ):
        return f"publication {pub}: already exists"
    statement = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
        sql.Identifier(pub), qualified(schema, table)
    )
    text = statement.as_string(conn)
    if _exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s AND puballtables", pub):
        raise ConfigError(
            f"publication {pub} is FOR ALL TABLES; the relay needs one limited to "
            f"{schema}.{table}: DROP PUBLICATION {pub}, then run `cdc-relay init` again"
        )
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        raise ConfigError(
            f"publication {pub} does not cover {schema}.{table} and this role may not add "
            f"it: run {text} as the publication's owner"
        ) from None
    return f"publication {pub}: added {schema}.{table} (the publication did not cover it)"


FAILOVER_MIN_VERSION = 170000  # failover slots and slot synchronization: PostgreSQL 17


def check_failover_supported(conn: psycopg.Connection[Any]) -> None:
    """Failover slots exist from PostgreSQL 17; older servers get one line, not a SQL error."""
    version = conn.info.server_version
    if version < FAILOVER_MIN_VERSION:
        raise ConfigError(
            f"--failover needs PostgreSQL 17 or later (this server is "
            f"{version // 10000}.{version % 10000}): failover slots do not exist before 17; "
            "run init without --failover (the slot will not survive a promotion)"
        )


def _create_slot(conn: psycopg.Connection[Any], slot: str, *, failover: bool) -> str:
    """The logical pgoutput slot (a failover slot when asked); one report line."""
    if conn.info.server_version >= FAILOVER_MIN_VERSION:
        row = conn.execute(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT false FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    if row is not None:
        if failover and not row[0]:
            return (
                f"replication slot {slot}: exists WITHOUT failover: stop the relay and "
                f"run ALTER_REPLICATION_SLOT {slot} (FAILOVER true) on a replication connection"
                f' (psql "dbname=... replication=database"), or `cdc-relay drop` and init again'
            )
        return f"replication slot {slot}: already exists" + (" (failover)" if row[0] else "")
    if failover:
        created = conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput',"
            " false, false, true)",
            (slot,),
        ).fetchone()
    else:
        created = conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,)
        ).fetchone()
    assert created is not None
    return f"replication slot {slot}: created at {created[0]}" + (" (failover)" if failover else "")


def _create_functions(
    conn: psycopg.Connection[Any], table: tuple[str, str], ddl: sql.Composed, name: str
) -> list[str]:
    """Apply ``ddl``, which defines function ``name``; one line: created, there or updated."""
    names = [name]

    def sources() -> dict[str, str]:
        rows = conn.execute(
            "SELECT p.proname, p.prosrc || p.prosecdef::text || coalesce(p.proconfig::text, '')"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s AND p.proname = ANY(%s)",
            (table[0], names),
        ).fetchall()
        return {name: src for name, src in rows}

    before = sources()
    conn.execute(ddl)
    after = sources()
    report = []
    for name in names:
        state = "created"
        if name in before:
            state = "already exists" if before[name] == after.get(name) else "updated"
        report.append(f"function {table[0]}.{name}: {state}")
    return report


def grant(conn: psycopg.Connection[Any], settings: Settings, role: str) -> list[str]:
    """Grant ``role`` what run, status and dead-letters need, and say what was granted.

    The role needs LOGIN REPLICATION itself (an attribute, not a grant). What it
    does not need, measured: the walsender decodes with pgoutput without checking
    table privileges, so no SELECT on the outbox (only ``resync``, which reads rows,
    and ``prune``, which deletes them, need more); validation and ``status`` read
    catalogs and functions open to PUBLIC. USAGE on the schema is needed to name the
    dead-letter table; SELECT/UPDATE on it for ``dead-letters list|replay``.
    """
    # Amazon RDS/Aurora: membership in rds_replication stands for the REPLICATION attribute.
    row = conn.execute(
        "SELECT r.rolcanlogin, r.rolreplication OR EXISTS (SELECT 1 FROM pg_auth_members m"
        " JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid"
        " AND g.rolname = 'rds_replication'), r.rolsuper FROM pg_roles r WHERE r.rolname = %s",
        (role,),
    ).fetchone()
    if row is None:
        raise ConfigError(
            f"role {role} does not exist; CREATE ROLE {role} LOGIN REPLICATION PASSWORD '...'"
        )
    can_login, replication, superuser = row
    schema = settings.table_parts[0]
    dl_schema, dl_table = settings.dead_letter_table
    r = sql.Identifier(role)
    seq = conn.execute(
        "SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace n ON n.oid = t.relnamespace"
        " WHERE d.classid = 'pg_class'::regclass AND n.nspname = %s AND t.relname = %s",
        (dl_schema, dl_table),
    ).fetchone()
    grants: list[tuple[sql.Composable, str]] = [
        (
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), r),
            f"USAGE on schema {schema}",
        ),
        (
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(
                qualified(dl_schema, dl_table), r
            ),
            f"SELECT, INSERT, UPDATE on {dl_schema}.{dl_table}",
        ),
    ]
    st_schema, st_table = state.table_name(settings)
    if state.exists(conn, (st_schema, st_table)):
        grants.append(
            (
                sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(
                    qualified(st_schema, st_table), r
                ),
                f"SELECT, INSERT, UPDATE on {st_schema}.{st_table}",
            )
        )
    keys = emit_key_table(settings.table_parts)
    if table_exists(conn, *keys):
        grants.append(
            (
                sql.SQL("GRANT SELECT ON {} TO {}").format(qualified(*keys), r),
                f"SELECT on {'.'.join(keys)} (to check emitted messages)",
            )
        )
    if dl_schema != schema:
        grants.insert(
            0,
            (
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(dl_schema), r),
                f"USAGE on schema {dl_schema}",
            ),
        )
    if seq is not None:
        grants.append(
            (
                sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(qualified(dl_schema, seq[0]), r),
                f"USAGE on sequence {dl_schema}.{seq[0]}",
            )
        )
    report = []
    for statement, what in grants:
        conn.execute(statement)
        report.append(f"granted to {role}: {what}")
    if not (can_login and (replication or superuser)):
        report.append(
            f"warning: role {role} also needs LOGIN REPLICATION: "
            f"ALTER ROLE {role} LOGIN REPLICATION"
        )
    return report


EMIT_SIGNATURE: Final = "(text, text, text, jsonb, jsonb, text, text)"


def grant_emit(conn: psycopg.Connection[Any], settings: Settings, role: str) -> list[str]:
    """Let ``role`` call ``<table>_emit``: the same trust as INSERT on the outbox table."""
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
        raise ConfigError(f"role {role} does not exist (--grant-emit-to); CREATE ROLE {role}")
    schema = settings.table_parts[0]
    emit = function_names(settings.table_parts)[1]
    r = sql.Identifier(role)
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), r))
    conn.execute(
        sql.SQL("GRANT EXECUTE ON FUNCTION {}" + EMIT_SIGNATURE + " TO {}").format(
            qualified(schema, emit), r
        )
    )
    return [f"granted to {role}: USAGE on schema {schema}, EXECUTE on {schema}.{emit}"]


def check_wal_level(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SHOW wal_level").fetchone()
    level = row[0] if row else "unknown"
    if level != "logical":
        raise ConfigError(
            f"wal_level is '{level}', logical replication needs 'logical': "
            "set wal_level = logical in postgresql.conf (ALTER SYSTEM SET wal_level = logical) "
            "and restart Postgres"
        )


@dataclass(slots=True)
class SlotInfo:
    plugin: str | None
    slot_type: str
    database: str | None
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None
    two_phase: bool


def slot_info(conn: psycopg.Connection[Any], slot: str) -> SlotInfo | None:
    row = conn.execute(
        "SELECT plugin, slot_type, database, active, active_pid, confirmed_flush_lsn::text,"
        " restart_lsn::text, wal_status, two_phase"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None else SlotInfo(*row)


@dataclass(frozen=True, slots=True)
class StartupFacts:
    """What validation learnt that the session needs (one representation each)."""

    outbox_relid: int  # the relation the publication covers: the outbox is this OID
    confirmed_flush_lsn: int  # where the slot resumes; the tracker never flushes below it
    # The key <table>_emit signs messages with; None: the outbox does not use emitted
    # messages, and the relay does not ask pgoutput for logical messages at all.
    emit_key: bytes | None = None


def validate(conn: psycopg.Connection[Any], settings: Settings) -> StartupFacts:
    """Raise ConfigError for the first thing that would make the stream wrong or empty."""
    _check_encoding(conn)
    check_wal_level(conn)
    rel = check_outbox_table(conn, settings)
    if rel is None:
        _check_tableless_publication(conn, settings)
        relid = 0  # table-less: only outbox_emit's messages, no relation is the outbox
    else:
        relid, relkind = rel
        _check_publication(conn, settings, relkind)
    _check_emit_prefix(conn, settings)
    emit_key = read_emit_key(conn, settings, tableless=rel is None)
    # Before the slot: a resync under way has no slot (or an idle new one) for a while.
    unreadable = state.check_no_resync(conn, settings)
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
    if _unsigned_emit_function(conn, settings) is not None:
        raise ConfigError(_unsigned_emit_hint(settings))
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
            _missing_privilege(conn, f"SELECT on {name}, the key emitted messages are checked with")
        ) from None
    if row is None or len(row[0]) != EMIT_KEY_SIZE:
        raise ConfigError(f"emit key table {name} holds no valid key: run `cdc-relay init --emit`")
    return bytes(row[0])


def _unsigned_emit_function(conn: psycopg.Connection[Any], settings: Settings) -> str | None:
    """The name of an init-written ``<table>_emit`` that does not sign its messages, if any."""
    schema = settings.table_parts[0]
    emit = function_names(settings.table_parts)[1]
    rows = conn.execute(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s AND p.proname = %s",
        (schema, emit),
    ).fetchall()
    unsigned = [s for (s,) in rows if _EMIT_PREFIX.search(s) and "sha256(" not in s]
    return f"{schema}.{emit}" if unsigned else None


def _unsigned_emit_hint(settings: Settings) -> str:
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
    schema = settings.table_parts[0]
    emit = function_names(settings.table_parts)[1]
    rows = conn.execute(
        "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s AND p.proname = %s",
        (schema, emit),
    ).fetchall()
    calls = (m for (source,) in rows for m in _EMIT_PREFIX.finditer(source))
    prefixes = {m.group(1).replace("''", "'") for m in calls}
    if prefixes and settings.message_prefix not in prefixes:
        written = sorted(prefixes)[0]
        raise ConfigError(
            f"{schema}.{emit} writes messages with prefix {written!r} but --message-prefix is "
            f"{settings.message_prefix!r}, so its messages would never be published: run with "
            f"--message-prefix {written}, or run `cdc-relay init --message-prefix "
            f"{settings.message_prefix}` to rewrite the function"
        )


def check_outbox_table(conn: psycopg.Connection[Any], settings: Settings) -> tuple[int, str] | None:
    """(oid, relkind) of the outbox after checking its columns, or None when there is no table."""
    schema, table = settings.table_parts
    rel = _relation(conn, schema, table)
    if rel is not None:
        _check_columns(conn, rel[0], f"{schema}.{table}")
    return rel


def publication_exists(conn: psycopg.Connection[Any], publication: str) -> bool:
    return _exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", publication)


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


def _check_columns(conn: psycopg.Connection[Any], relid: int, name: str) -> None:
    """Every outbox column by its name: a renamed optional column would silently vanish.

    A generated column (``GENERATED ALWAYS AS (...)``) is refused too: pgoutput
    leaves generated columns out of every row, so a generated ``routing_key``
    passed this check and was silently ignored.
    """
    rows = conn.execute(
        "SELECT attname, attgenerated <> '' FROM pg_attribute WHERE attrelid = %s"
        " AND attnum > 0 AND NOT attisdropped",
        (relid,),
    ).fetchall()
    present = {r[0] for r in rows}
    missing = [c for c in OUTBOX_COLUMNS if c not in present]
    if missing:
        raise ConfigError(
            f"outbox table {name} lacks column(s) {', '.join(missing)} (renamed or dropped?); "
            "the relay needs every column of `cdc-relay init --print-sql`"
        )
    generated = [c for c in OUTBOX_COLUMNS if (c, True) in rows]
    if generated:
        raise ConfigError(
            f"outbox table {name} has generated column(s) {', '.join(generated)}: logical "
            "replication does not send generated columns, so the relay would never see their "
            "values; make them plain columns and set them in the INSERT"
        )


def _check_publication(conn: psycopg.Connection[Any], settings: Settings, relkind: str) -> None:
    schema, table = settings.table_parts
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
            f"limited to {schema}.{table}: drop it and run `cdc-relay init`"
        )
    others = conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables"
        " WHERE pubname = %s AND NOT (schemaname = %s AND tablename = %s)",
        (settings.publication, schema, table),
    ).fetchall()
    if others:
        names = ", ".join(r[0] for r in others)
        raise ConfigError(
            f"publication {settings.publication} also covers {names}; it must cover only "
            f"{schema}.{table}: ALTER PUBLICATION {settings.publication} DROP TABLE {names}"
        )
    if not pubinsert or pubupdate or pubdelete or pubtruncate:
        raise ConfigError(
            f"publication {settings.publication} must publish inserts only: "
            f"ALTER PUBLICATION {settings.publication} SET (publish = 'insert')"
        )
    has_filter, attnames = covered
    missing = [c for c in OUTBOX_COLUMNS if attnames is not None and c not in attnames]
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


def status(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    require_active: bool = True,
    max_lag_bytes: int | None = None,
    max_stall: timedelta | None = None,
) -> dict[str, Any]:
    """What an operator asks first: is it streaming, how far behind, how much WAL is held.

    ``healthy`` is True only when validation passes, a relay is attached (unless
    ``require_active`` is False) and the lag is within ``max_lag_bytes``;
    ``problem`` says why not, naming a missing privilege when that is the cause.
    Pointed at a standby it answers the failover question instead (``standby_status``).
    ``warnings`` never make it unhealthy: they name a risk, not an outage.
    """
    in_recovery = _in_recovery(conn)
    if in_recovery:
        return standby_status(conn, settings)
    info = slot_info(conn, settings.slot)
    result: dict[str, Any] = {
        "role": "primary",
        "slot": settings.slot,
        "slot_exists": info is not None,
    }
    problems: list[str] = []
    warnings: list[str] = []
    health = _relay_health(conn, settings, problems)
    if info is not None:
        lag = conn.execute(
            "SELECT pg_current_wal_lsn()::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, safe_wal_size"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        ).fetchone()
        assert lag is not None
        failover = _slot_flags(conn, settings.slot).get("failover")
        result.update(
            plugin=info.plugin,
            database=info.database,
            active=info.active,
            active_pid=info.active_pid,
            active_client=_client_of(conn, info.active_pid),
            failover=failover,
            confirmed_flush_lsn=info.confirmed_flush_lsn,
            restart_lsn=info.restart_lsn,
            wal_status=info.wal_status,
            current_wal_lsn=lag[0],
            lag_bytes=lag[1],
            retained_wal_bytes=lag[2],
            safe_wal_size=lag[3],
        )
        retention = _wal_retention(settings.slot, info.wal_status, lag[2])
        if info.wal_status == "unreserved":
            problems.append(retention)
        elif retention:
            warnings.append(retention)
        if failover:
            warnings += _failover_warnings(conn, settings.slot)
        if require_active and not info.active:
            problems.append(_not_attached(settings.slot, health))
        if max_lag_bytes is not None and lag[1] is not None and lag[1] > max_lag_bytes:
            problems.append(f"lag {lag[1]} bytes exceeds --max-lag-bytes {max_lag_bytes}")
    pub_tables = conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s"
        " ORDER BY 1",
        (settings.publication,),
    ).fetchall()
    result["publication"] = settings.publication
    result["publication_exists"] = _exists(
        conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", settings.publication
    )
    result["publication_tables"] = [r[0] for r in pub_tables]
    dl_schema, dl_table = settings.dead_letter_table
    if table_exists(conn, dl_schema, dl_table):
        try:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE replayed_at IS NULL").format(
                    qualified(dl_schema, dl_table)
                )
            ).fetchone()
            result["dead_letters_pending"] = row[0] if row else 0
        except psycopg.errors.InsufficientPrivilege:
            result["dead_letters_pending"] = None
            problems.append(_missing_privilege(conn, f"SELECT on {dl_schema}.{dl_table}"))
        except TIMEOUT_ERRORS as exc:
            result["dead_letters_pending"] = None
            problems.append(could_not_read(f"dead-letter table {dl_schema}.{dl_table}", exc))
    problems += _relay_reports(health, max_stall)
    try:
        validate(conn, settings)
    except ConfigError as exc:
        problems.insert(0, str(exc))
    except psycopg.errors.InsufficientPrivilege as exc:
        problems.insert(0, _missing_privilege(conn, one_line(str(exc))))
    warnings += emit_warnings(conn, settings)
    result["healthy"] = not problems
    result["problem"] = problems[0] if problems else None
    result["problems"] = problems
    result["warnings"] = warnings
    return result


def emit_warnings(conn: psycopg.Connection[Any], settings: Settings) -> list[str]:
    """What the relay cannot enforce about emitted messages (only where the outbox uses them)."""
    keys = emit_key_table(settings.table_parts)
    if not table_exists(conn, *keys):
        return []
    schema = settings.table_parts[0]
    emit = f"{schema}.{function_names(settings.table_parts)[1]}"
    key_name = ".".join(keys)
    row = conn.execute(
        "SELECT (SELECT bool_or(has_function_privilege('public', p.oid, 'EXECUTE'))"
        "        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        "        WHERE n.nspname = %s AND p.proname = %s),"
        " has_table_privilege('public', %s::regclass, 'SELECT'),"
        " (SELECT bool_or(has_function_privilege('public', oid, 'EXECUTE')) FROM pg_proc"
        "  WHERE proname = 'pg_logical_emit_message')",
        (schema, function_names(settings.table_parts)[1], sql.Identifier(*keys).as_string(conn)),
    ).fetchone()
    emit_public, key_public, raw_public = row if row is not None else (False, False, False)
    warnings = []
    if emit_public:
        warnings.append(
            f"{emit} is executable by PUBLIC: any role can publish through the relay; "
            f"REVOKE EXECUTE ON FUNCTION {emit} FROM PUBLIC and grant it with "
            "`cdc-relay init --grant-emit-to ROLE`"
        )
    if key_public:
        warnings.append(
            f"the emit key table {key_name} is readable by PUBLIC: any role can sign messages; "
            f"REVOKE ALL ON {key_name} FROM PUBLIC, then replace the key (docs/operations.md)"
        )
    if raw_public:
        warnings.append(
            f"any role may call pg_logical_emit_message: the relay dead-letters messages with "
            f"prefix {settings.message_prefix!r} that {emit} did not sign (never publishes "
            "them), but cannot stop them filling the dead-letter table; REVOKE EXECUTE on "
            "pg_logical_emit_message FROM PUBLIC if nothing else needs it"
        )
    return warnings


def _relay_health(
    conn: psycopg.Connection[Any], settings: Settings, problems: list[str]
) -> state.RelayHealth | None:
    """What the running relay last reported in its state row (None: nothing fresh to read)."""
    table = state.table_name(settings)
    try:
        health = state.read_health(conn, table, settings.slot)
    except psycopg.errors.InsufficientPrivilege:
        return None  # an older grant: status still answers from the catalogs
    except TIMEOUT_ERRORS as exc:
        problems.append(could_not_read(f"relay state table {'.'.join(table)}", exc))
        return None
    return health if health is not None and health.fresh else None


def _not_attached(slot: str, health: state.RelayHealth | None) -> str:
    """The slot is inactive: say so, unless a relay reported recently (between sessions)."""
    if health is None or health.age is None:
        return f"no relay is attached to slot {slot}"
    said = f"{health.problem}" if health.problem else "between sessions, reconnecting"
    return (
        f"no relay holds slot {slot} right now, but a relay reported "
        f"{health.age.total_seconds():.0f}s ago: {said}"
    )


DEFAULT_MAX_STALL: Final = timedelta(seconds=120)
"""``status --max-stall``: longer than a slow broker's confirm (--confirm-timeout,
30 s by default) plus a session's reconnect backoff (up to 30 s), so a healthy relay
that just recovered is not called stalled, yet short enough for a cron probe to
page within a few minutes of a broker alarm."""


def _relay_reports(health: state.RelayHealth | None, max_stall: timedelta | None) -> list[str]:
    """The running relay's own trouble, as status problems (it cannot be seen in the catalogs)."""
    if health is None:
        return []
    found = []
    if health.problem:
        since = state.format_since(health.problem_since) if health.problem_since else "?"
        found.append(f"the relay reports (since {since}): {health.problem}")
    if health.broker_blocked_since is not None:
        found.append(
            "RabbitMQ has blocked the relay's connection since "
            f"{state.format_since(health.broker_blocked_since)} (a memory or disk alarm): "
            "nothing is delivered until it clears (rabbitmq-diagnostics alarms)"
        )
    if max_stall is not None and health.waiting_since is not None and health.age is not None:
        assert health.heartbeat_at is not None
        waited = health.heartbeat_at + health.age - health.waiting_since
        if waited > max_stall:
            found.append(
                f"the relay's confirmed position has not moved for {waited.total_seconds():.0f}s "
                f"with messages waiting (--max-stall {max_stall.total_seconds():.0f}s)"
            )
    return found


def _wal_retention(slot: str, wal_status: str | None, retained: int | None) -> str:
    """What the slot's ``wal_status`` means for the operator ("" when nothing to say).

    ``unreserved`` is an outage announced in advance: the next checkpoint removes
    WAL the slot still needs (``lost`` is reported by validation).
    """
    held = f"{retained:,} bytes" if retained is not None else "more WAL than allowed"
    if wal_status == "unreserved":
        return (
            f"slot {slot} is about to be invalidated (wal_status=unreserved): it holds {held} "
            "of WAL, beyond max_slot_wal_keep_size, and the next checkpoint removes what it "
            "still needs unless the relay catches up first; afterwards only `cdc-relay resync` "
            "recovers (docs/recovery.md)"
        )
    if wal_status == "extended":
        return (
            f"slot {slot} holds {held} of WAL, beyond max_wal_size (wal_status=extended): "
            "the relay is far behind or stopped; see safe_wal_size for the room left"
        )
    return ""


def _client_of(conn: psycopg.Connection[Any], pid: int | None) -> str | None:
    """Which relay holds the slot: its application_name and address (walsender ``pid``).

    With active/standby relays this is the one streaming; the others wait for it.
    """
    if pid is None:
        return None
    row = conn.execute(
        "SELECT application_name, coalesce(host(client_addr), 'local'), client_port"
        " FROM pg_stat_replication WHERE pid = %s",
        (pid,),
    ).fetchone()
    return None if row is None else f"{row[0]} at {row[1]}:{row[2]}"


def _in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def _slot_flags(conn: psycopg.Connection[Any], slot: str) -> dict[str, bool | None]:
    """failover/synced/temporary of a slot; None for what this server version lacks."""
    if conn.info.server_version < FAILOVER_MIN_VERSION:
        row = conn.execute(
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        temporary = None if row is None else bool(row[0])
        return {"failover": None, "synced": None, "temporary": temporary}
    row = conn.execute(
        "SELECT failover, synced, temporary FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return {"failover": None, "synced": None, "temporary": None}
    return {"failover": bool(row[0]), "synced": bool(row[1]), "temporary": bool(row[2])}


def _failover_warnings(conn: psycopg.Connection[Any], slot: str) -> list[str]:
    """Why a failover slot on this primary could still lose or invent events at a failover."""
    row = conn.execute("SHOW synchronized_standby_slots").fetchone()
    names = [n.strip() for n in (row[0] if row else "").split(",") if n.strip()]
    if not names:
        return [
            f"slot {slot} is a failover slot but synchronized_standby_slots is empty: the relay "
            "may publish changes a promoted standby never received (phantom events); set "
            "synchronized_standby_slots = '<the standby's physical slot>' on the primary"
        ]
    warnings = []
    rows = conn.execute(
        "SELECT slot_name, slot_type, active FROM pg_replication_slots WHERE slot_name = ANY(%s)",
        (names,),
    ).fetchall()
    known = {name: (slot_type, active) for name, slot_type, active in rows}
    for name in names:
        if name not in known or known[name][0] != "physical":
            warnings.append(
                f"synchronized_standby_slots names {name}, which is not a physical slot here: "
                "logical decoding waits for it"
            )
        elif not known[name][1]:
            warnings.append(
                f"standby slot {name} (synchronized_standby_slots) is not active: the relay "
                "receives nothing until that standby streams again or the slot is removed "
                "from synchronized_standby_slots"
            )
    return warnings


def standby_status(conn: psycopg.Connection[Any], settings: Settings) -> dict[str, Any]:
    """Whether this standby could take over: it holds a sync-ready copy of the slot.

    Only ``synced AND NOT temporary`` survives promotion; a temporary copy (the
    standby is still behind the primary's catalog xmin) is dropped when promoted,
    and the relay would then find no slot at all.
    """
    flags = _slot_flags(conn, settings.slot)
    info = slot_info(conn, settings.slot)
    replay = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
    ready = bool(flags["synced"]) and flags["temporary"] is False
    result: dict[str, Any] = {
        "role": "standby",
        "slot": settings.slot,
        "slot_exists": info is not None,
        "failover": flags["failover"],
        "synced": flags["synced"],
        "temporary": flags["temporary"],
        "failover_ready": ready,
        "confirmed_flush_lsn": info.confirmed_flush_lsn if info else None,
        "replay_lsn": replay[0] if replay else None,
    }
    problems: list[str] = []
    if conn.info.server_version < FAILOVER_MIN_VERSION:
        problems.append(
            "this is a standby of PostgreSQL < 17: it cannot hold a copy of a logical slot, "
            "so the relay cannot continue after a promotion (see docs/ha.md)"
        )
    elif info is None:
        problems.append(
            f"this standby holds no copy of slot {settings.slot}: create the slot with "
            "`cdc-relay init --failover` and set sync_replication_slots = on, "
            "hot_standby_feedback = on and dbname in primary_conninfo here"
        )
    elif not ready:
        problems.append(
            f"this standby's copy of slot {settings.slot} is not sync-ready yet (synced="
            f"{flags['synced']}, temporary={flags['temporary']}): a temporary copy is dropped "
            "at promotion; it becomes persistent once the relay confirms past a standby snapshot"
            " (SELECT pg_log_standby_snapshot() on the primary)"
        )
    result["healthy"] = not problems
    result["problem"] = problems[0] if problems else None
    result["problems"] = problems
    result["warnings"] = []
    return result


def _missing_privilege(conn: psycopg.Connection[Any], what: str) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    user = row[0] if row else "this role"
    return (
        f"role {user} lacks a privilege ({what}); run `cdc-relay init --grant-to {user}` "
        "as an admin"
    )


def prune_outbox(
    conn: psycopg.Connection[Any],
    settings: Settings,
    older_than: timedelta,
    *,
    batch: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete outbox rows older than the retention, ``batch`` rows per transaction.

    Safe for delivery: the relay reads inserts from the WAL, not the table, and
    the publication publishes inserts only, so these deletes never reach it.
    Small autocommit batches keep locks short and never pin the xmin horizon.
    """
    query = sql.SQL(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE created_at < now() - %s LIMIT %s)"
    ).format(t=qualified(*settings.table_parts))
    total = 0
    while True:
        deleted = conn.execute(query, (older_than, batch)).rowcount
        total += deleted
        if deleted < batch:
            return total
        if progress is not None:
            progress(total)


RETENTION_INTERVAL: Final = 60.0  # seconds between background retention passes
RETENTION_BATCH: Final = 500  # rows per DELETE in the background
RETENTION_PAUSE: Final = 0.05  # seconds between batches: a low rate, never a lock storm


async def retain_outbox(
    settings: Settings,
    older_than: timedelta,
    stop: asyncio.Event,
    *,
    interval: float = RETENTION_INTERVAL,
    batch: int = RETENTION_BATCH,
    pause: float = RETENTION_PAUSE,
    on_pass: Callable[[int], None] | None = None,
) -> None:
    """``run --retention``: every ``interval`` seconds, prune rows older than ``older_than``.

    Runs beside the stream until ``stop`` is set. Each pass uses its own short
    connection and deletes ``batch`` rows per transaction with a pause between
    batches, so it never holds many locks or competes with the application. A
    failed pass is logged and retried at the next one: retention must never end
    the relay. Safe for delivery like ``prune`` (deletes are not published);
    ``on_pass`` gets the number of rows each pass deleted.
    """
    while not stop.is_set():
        try:
            deleted = await asyncio.to_thread(
                _retention_pass, settings, older_than, batch, pause, stop
            )
        except (psycopg.Error, ConfigError, OSError) as exc:
            log.warning(
                "retention pass failed (retrying in %.0fs): %s", interval, one_line(str(exc))
            )
        else:
            if deleted:
                log.info("retention: deleted %d outbox row(s) older than %s", deleted, older_than)
            if on_pass is not None:
                on_pass(deleted)
        await event_within(stop, interval)


def _retention_pass(
    settings: Settings, older_than: timedelta, batch: int, pause: float, stop: asyncio.Event
) -> int:
    query = sql.SQL(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE created_at < now() - %s LIMIT %s)"
    ).format(t=qualified(*settings.table_parts))
    total = 0
    with connect(settings.dsn, application_name="cdc-relay retention") as conn:
        conn.execute("SET statement_timeout = '30s'; SET lock_timeout = '2s'")
        while not stop.is_set():
            deleted = conn.execute(query, (older_than, batch)).rowcount
            total += deleted
            if deleted < batch:
                break
            time.sleep(pause)
    return total


def drop(conn: psycopg.Connection[Any], settings: Settings, *, publication: bool) -> list[str]:
    report: list[str] = []
    info = slot_info(conn, settings.slot)
    if info is None:
        report.append(f"replication slot {settings.slot}: did not exist")
    else:
        if info.active:
            raise ConfigError(
                f"replication slot {settings.slot} is in use by pid {info.active_pid}; "
                "stop the relay first"
            )
        conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot,))
        report.append(f"replication slot {settings.slot}: dropped")
    if publication:
        if _exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", settings.publication):
            conn.execute(
                sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(settings.publication))
            )
            report.append(f"publication {settings.publication}: dropped")
        else:
            report.append(f"publication {settings.publication}: did not exist")
    return report

"""Set up and remove the Postgres side: tables, functions, publication, slot, grants.

``init`` creates what is missing and says, one line per object, what it found;
``drop`` removes the slot (and the publication when asked). The DDL itself
comes from ``cdc_relay.schema``; this module only decides what to apply.

Emitted messages (``<table>_emit``) have the outbox table's trust boundary.
The existence of ``<table>_emit_key`` records that an outbox uses them: the
relay must read that key anyway to check each message's HMAC, so one fact
decides both whether ``run`` asks pgoutput for logical messages and what it
accepts; a flag elsewhere could disagree with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from cdc_relay import deadletters, state
from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.layout import DEFAULT_LAYOUT, build_layout
from cdc_relay.pg.catalog import (
    FAILOVER_MIN_VERSION,
    check_wal_level,
    publication_exists,
    relation,
    row_exists,
    slot_info,
    table_exists,
)
from cdc_relay.pg.checks import check_columns, layout_of, unsigned_emit_function, unsigned_emit_hint
from cdc_relay.pg.slotwait import SlotCreationWatch
from cdc_relay.schema import (
    DEFAULT_INBOX_TABLE,
    EMIT_SIGNATURE,
    emit_function_ddl,
    emit_key_table,
    enqueue_function_ddl,
    function_names,
    inbox_ddl,
    outbox_ddl,
    qualified,
    split_table_name,
)
from cdc_relay.schema import render_sql as render_script


def _create_inbox(conn: psycopg.Connection[Any]) -> str:
    """The processed-messages table of ``cdc_relay.inbox`` (consumers dedupe with it)."""
    table = split_table_name(DEFAULT_INBOX_TABLE)
    existed = table_exists(conn, *table)
    conn.execute(inbox_ddl(table))
    state_word = "already exists" if existed else "created"
    return f"table {DEFAULT_INBOX_TABLE}: {state_word} (for idempotent consumers)"


def render_sql(settings: Settings, *, inbox: bool = True) -> str:
    """Everything ``init`` creates in SQL, as one script (``init --print-sql``)."""
    return render_script(
        settings.table_parts,
        settings.dead_letter_table,
        settings.message_prefix,
        inbox=inbox,
        layout=settings.layout,
    )


def init(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    create_table: bool = True,
    grant_to: str | None = None,
    failover: bool = False,
    emit: bool = False,
    grant_emit_to: Sequence[str] = (),
    inbox: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """Create what is missing; return one line per object saying created or already there.

    ``progress`` gets a line every few seconds while the slot's creation waits
    for older transactions to end (``pg.slotwait``).

    With ``failover`` the slot is created as a failover slot (PostgreSQL 17+), which
    a standby with ``sync_replication_slots`` keeps a copy of (see docs/ha.md).
    Without ``inbox`` the consumers' ``processed_messages`` table is not created
    here (``cdc_relay.inbox.ddl()`` or the Django migration create it where the
    consumers are).
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
    layout = layout_of(settings)
    tableless = not create_table and not table_exists(conn, schema, table)
    if tableless and not layout.is_default:
        raise ConfigError(
            f"--layout/--column/--header-column map the columns of an existing table, but "
            f"{schema}.{table} does not exist: create it (or fix --table) and run init again"
        )
    if create_table:
        existed = table_exists(conn, schema, table)
        # init creates only a layout's own columns: a mapped one names columns of yours.
        if not existed and layout not in (DEFAULT_LAYOUT, build_layout(layout.name)):
            raise ConfigError(
                f"--column/--header-column map the columns of an existing table, but "
                f"{schema}.{table} does not exist: create it, then run init again "
                "(`cdc-relay init --no-table` for this table alone)"
            )
        conn.execute(outbox_ddl((schema, table), layout.name))
        report.append(f"table {schema}.{table}: {'already exists' if existed else 'created'}")
    rel = relation(conn, schema, table)
    if rel is not None and not layout.is_default:
        # Refuse now, in one line naming the column, what the relay could not read.
        check_columns(conn, rel[0], f"{schema}.{table}", layout)
        report.append(f"table {schema}.{table}: its columns fit --layout {layout.name}")
    elif tableless:
        report.append(
            f"table {schema}.{table}: none (table-less outbox: publish with "
            f"{function_names((schema, table))[1]}; create the table from "
            "`cdc-relay init --print-sql` to use rows too)"
        )
    report += deadletters.create(conn, settings.dead_letter_table)
    report += state.create(conn, state.table_name(settings))
    if inbox:
        report.append(_create_inbox(conn))
    keys = emit_key_table((schema, table))
    enqueue_name, emit_name = function_names((schema, table))
    use_emit = emit or bool(grant_emit_to) or tableless or table_exists(conn, *keys)
    if not tableless and not layout.is_default:
        report.append(
            f"function {enqueue_name}: not created (it writes init's columns; with --layout "
            f"{layout.name} your writers insert the rows)"
        )
    elif not tableless:
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
    elif unsigned_emit_function(conn, settings) is not None:
        report.append(f"warning: {unsigned_emit_hint(settings)}")

    if publication_exists(conn, settings.publication):
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
        rel = relation(conn, schema, table)
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
    if tableless or row_exists(
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
    if row_exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s AND puballtables", pub):
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
    grants: list[tuple[sql.Composed, str]] = [
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
        if row_exists(
            conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", settings.publication
        ):
            conn.execute(
                sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(settings.publication))
            )
            report.append(f"publication {settings.publication}: dropped")
        else:
            report.append(f"publication {settings.publication}: did not exist")
    return report

"""Set up, check, inspect and remove the Postgres side: table, publication, slot.

All of it uses an ordinary (non-replication) connection. Validation turns each
misconfiguration into one ConfigError line naming the fix, because a relay
that streams nothing without saying why is the worst failure an outbox can have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc_relay.config import ConfigError, Settings

OUTBOX_DDL = """\
CREATE TABLE IF NOT EXISTS {table} (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb NOT NULL DEFAULT '{{}}',
    exchange       text NULL,
    routing_key    text NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
)"""

DEAD_LETTER_DDL = """\
CREATE TABLE IF NOT EXISTS {table} (
    id          bigserial PRIMARY KEY,
    outbox_id   uuid NOT NULL,
    reason      text NOT NULL,
    row_data    jsonb NOT NULL,
    lsn         pg_lsn NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz NULL
)"""


def qualified(schema: str, table: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


def connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ConfigError(f"cannot connect to Postgres ({first}); check --dsn") from None


def _exists(conn: psycopg.Connection[Any], query: str, *params: Any) -> bool:
    return conn.execute(query, params).fetchone() is not None


def table_exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    return _exists(
        conn,
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        schema,
        table,
    )


def init(
    conn: psycopg.Connection[Any], settings: Settings, *, create_table: bool = True
) -> list[str]:
    """Create what is missing; return one line per object saying created or already there."""
    report: list[str] = []
    schema, table = settings.table_parts
    if create_table:
        existed = table_exists(conn, schema, table)
        conn.execute(sql.SQL(OUTBOX_DDL).format(table=qualified(schema, table)))
        report.append(f"table {schema}.{table}: {'already exists' if existed else 'created'}")
    elif not table_exists(conn, schema, table):
        raise ConfigError(
            f"table {schema}.{table} does not exist; create it (see sql/outbox.sql) "
            "or run `cdc-relay init` without --no-table"
        )
    dl_schema, dl_table = settings.dead_letter_table
    existed = table_exists(conn, dl_schema, dl_table)
    conn.execute(sql.SQL(DEAD_LETTER_DDL).format(table=qualified(dl_schema, dl_table)))
    report.append(
        f"dead-letter table {dl_schema}.{dl_table}: {'already exists' if existed else 'created'}"
    )

    if _exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", settings.publication):
        report.append(f"publication {settings.publication}: already exists")
    else:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')").format(
                sql.Identifier(settings.publication), qualified(schema, table)
            )
        )
        report.append(f"publication {settings.publication}: created (inserts of {schema}.{table})")

    check_wal_level(conn)
    if _exists(conn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", settings.slot):
        report.append(f"replication slot {settings.slot}: already exists")
    else:
        row = conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
            (settings.slot,),
        ).fetchone()
        assert row is not None
        report.append(f"replication slot {settings.slot}: created at {row[0]}")
    return report


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


def slot_info(conn: psycopg.Connection[Any], slot: str) -> SlotInfo | None:
    row = conn.execute(
        "SELECT plugin, slot_type, database, active, active_pid, confirmed_flush_lsn::text,"
        " restart_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None else SlotInfo(*row)


def validate(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """Raise ConfigError for the first thing that would make the stream wrong or empty."""
    check_wal_level(conn)
    schema, table = settings.table_parts
    if not table_exists(conn, schema, table):
        raise ConfigError(
            f"outbox table {schema}.{table} does not exist; run `cdc-relay init` "
            "(or create it from sql/outbox.sql) or fix --table"
        )
    pub = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, puballtables"
        " FROM pg_publication WHERE pubname = %s",
        (settings.publication,),
    ).fetchone()
    if pub is None:
        raise ConfigError(
            f"publication {settings.publication} does not exist; run `cdc-relay init` "
            "or fix --publication"
        )
    pubinsert, pubupdate, pubdelete, pubtruncate, puballtables = pub
    if not _exists(
        conn,
        "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s"
        " AND tablename = %s",
        settings.publication,
        schema,
        table,
    ):
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
    info = slot_info(conn, settings.slot)
    if info is None:
        raise ConfigError(
            f"replication slot {settings.slot} does not exist; run `cdc-relay init` or fix --slot"
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
    if info.wal_status == "lost":
        raise ConfigError(
            f"replication slot {settings.slot} was invalidated (WAL removed, wal_status=lost); "
            "rows may have been missed: recreate it with `cdc-relay drop` and `cdc-relay init`, "
            "then reconcile the outbox"
        )


def status(conn: psycopg.Connection[Any], settings: Settings) -> dict[str, Any]:
    """What an operator asks first: is it streaming, how far behind, how much WAL is held."""
    info = slot_info(conn, settings.slot)
    result: dict[str, Any] = {"slot": settings.slot, "slot_exists": info is not None}
    if info is not None:
        lag = conn.execute(
            "SELECT pg_current_wal_lsn()::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        ).fetchone()
        assert lag is not None
        result.update(
            plugin=info.plugin,
            database=info.database,
            active=info.active,
            active_pid=info.active_pid,
            confirmed_flush_lsn=info.confirmed_flush_lsn,
            restart_lsn=info.restart_lsn,
            wal_status=info.wal_status,
            current_wal_lsn=lag[0],
            lag_bytes=lag[1],
            retained_wal_bytes=lag[2],
        )
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
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE replayed_at IS NULL").format(
                qualified(dl_schema, dl_table)
            )
        ).fetchone()
        result["dead_letters_pending"] = row[0] if row else 0
    try:
        validate(conn, settings)
        result["healthy"] = True
        result["problem"] = None
    except ConfigError as exc:
        result["healthy"] = False
        result["problem"] = str(exc)
    return result


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

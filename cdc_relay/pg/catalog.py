"""The admin connection and the catalog reads every operator command shares.

``setup``, ``checks``, ``report`` and ``retention`` each have one job; what they
all ask Postgres (does this table, publication or slot exist, which server
version) is answered here once, over an ordinary autocommit connection whose
failure is one ConfigError line, never a traceback with the DSN in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay.errors import ConfigError
from cdc_relay.redact import Redactor, one_line

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


def row_exists(conn: psycopg.Connection[Any], query: str, *params: Any) -> bool:
    return conn.execute(query, params).fetchone() is not None


def table_exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    return relation(conn, schema, table) is not None


def relation(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[int, str] | None:
    """(oid, relkind) of a table or partitioned table, or None."""
    row = conn.execute(
        "SELECT c.oid::bigint, c.relkind::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (schema, table),
    ).fetchone()
    return None if row is None else (int(row[0]), row[1])


def publication_exists(conn: psycopg.Connection[Any], publication: str) -> bool:
    return row_exists(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", publication)


FAILOVER_MIN_VERSION = 170000  # failover slots and slot synchronization: PostgreSQL 17


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


def missing_privilege(conn: psycopg.Connection[Any], what: str) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    user = row[0] if row else "this role"
    return (
        f"role {user} lacks a privilege ({what}); run `cdc-relay init --grant-to {user}` "
        "as an admin"
    )

"""The Postgres schema of cdc-relay: table names, quoting and every DDL, in one place.

Both sides read it: the app-side helpers (``outbox``, ``inbox``, the Django
migration) and the operator's commands (``pg.setup``, ``init --print-sql``).
So it imports nothing but ``psycopg.sql``, ``errors`` and the column list of the
row model (``rows``, which imports nothing): an application that enqueues rows
must not load the CLI's settings or the admin code with it.

Every identifier is quoted by ``psycopg.sql.Identifier``; helpers that hand
SQL text to other drivers (asyncpg, SQLAlchemy, Django) render it with
``as_string(None)``. The outbox, function and emit DDL is package data
(``cdc_relay/sql/*.sql``), read here and nowhere else.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Final

from psycopg import sql

from cdc_relay.errors import ConfigError
from cdc_relay.rows import OUTBOX_COLUMNS

DEFAULT_OUTBOX_TABLE: Final = "public.outbox"
DEFAULT_INBOX_TABLE: Final = "public.processed_messages"

# Every column of the outbox, in table order (defined with the row model, which has no
# imports of its own): init creates them, validation requires each by name.
# What the enqueue helpers insert: every column but created_at, which takes its default.
OUTBOX_INSERT_COLUMNS: Final = OUTBOX_COLUMNS[:-1]


def split_table_name(name: str) -> tuple[str, str]:
    """``schema.table`` (or ``table``, meaning public) -> (schema, table)."""
    schema, sep, table = name.partition(".")
    if not sep:
        schema, table = "public", name
    if not schema or not table or "." in table:
        raise ConfigError(f"invalid --table {name!r}: use schema.table, e.g. public.outbox")
    return schema, table


def qualified(schema: str, table: str) -> sql.Composed:
    """``"schema"."table"``, each part quoted as an identifier."""
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))


@functools.lru_cache(maxsize=64)
def qualified_text(table: tuple[str, str]) -> str:
    """``qualified`` as SQL text, for drivers that take strings (asyncpg, SQLAlchemy, Django).

    Cached: every enqueue names its table, and composing it costs 5 us (a few tables).
    """
    return qualified(*table).as_string(None)


def quoted(name: str) -> str:
    """One identifier as SQL text (an index name, a column)."""
    return sql.Identifier(name).as_string(None)


def _template(name: str) -> str:
    return (files("cdc_relay") / "sql" / name).read_text(encoding="utf-8")


# ---- the outbox and its functions -------------------------------------------------


def outbox_ddl(table: tuple[str, str], layout: str = "cdc-relay") -> sql.Composed:
    """CREATE TABLE IF NOT EXISTS for the outbox (package data cdc_relay/sql/outbox.sql).

    ``layout`` "debezium": Debezium's outbox columns (sql/debezium_outbox.sql) instead.
    """
    name = "debezium_outbox.sql" if layout == "debezium" else "outbox.sql"
    return sql.SQL(_template(name)).format(outbox=qualified(*table))


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


# The argument types of <table>_emit, for GRANT/REVOKE EXECUTE ON FUNCTION.
EMIT_SIGNATURE: Final = "(text, text, text, jsonb, jsonb, text, text)"


def enqueue_function_ddl(table: tuple[str, str]) -> sql.Composed:
    """``<table>_enqueue`` (package data cdc_relay/sql/functions.sql)."""
    enqueue = function_names(table)[0]
    return sql.SQL(_template("functions.sql")).format(
        outbox=qualified(*table), enqueue=qualified(table[0], enqueue)
    )


def emit_function_ddl(table: tuple[str, str], prefix: str) -> sql.Composed:
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


def functions_ddl(table: tuple[str, str], prefix: str) -> sql.Composed:
    """Both application functions: enqueue, then the emit key table and emit."""
    return sql.Composed([enqueue_function_ddl(table), emit_function_ddl(table, prefix)])


# ---- the relay's own tables --------------------------------------------------------

# outbox_id is text, not uuid: a user-managed outbox (init --no-table) may use any
# id, and a dead-letter insert that fails would stall the stream on that row.
DEAD_LETTER_DDL: Final = """\
CREATE TABLE IF NOT EXISTS {table} (
    id          bigserial PRIMARY KEY,
    outbox_id   text NULL,
    reason      text NOT NULL,
    row_data    jsonb NOT NULL,
    lsn         pg_lsn NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz NULL
);
"""


def dead_letter_ddl(table: tuple[str, str]) -> sql.Composed:
    """The CREATE TABLE statement for this dead-letter table."""
    return sql.SQL(DEAD_LETTER_DDL).format(table=qualified(*table))


def dead_letter_outbox_id_to_text(table: tuple[str, str]) -> sql.Composed:
    """Migrates a dead-letter table of an older cdc-relay (outbox_id uuid NOT NULL)."""
    return sql.SQL(
        "ALTER TABLE {} ALTER COLUMN outbox_id TYPE text USING outbox_id::text,"
        " ALTER COLUMN outbox_id DROP NOT NULL"
    ).format(qualified(*table))


STATE_DDL: Final = """\
CREATE TABLE IF NOT EXISTS {table} (
    slot_name           text PRIMARY KEY,
    confirmed_commit_at timestamptz NULL,
    confirmed_lsn       pg_lsn NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    resync_since        timestamptz NULL,
    system_identifier   text NULL
);
ALTER TABLE {table}
    ADD COLUMN IF NOT EXISTS problem              text NULL,
    ADD COLUMN IF NOT EXISTS problem_since        timestamptz NULL,
    ADD COLUMN IF NOT EXISTS broker_blocked_since timestamptz NULL,
    ADD COLUMN IF NOT EXISTS waiting_since        timestamptz NULL,
    ADD COLUMN IF NOT EXISTS heartbeat_at         timestamptz NULL;
"""
# Tables created before system_identifier existed get it from init or resync.
STATE_ADD_SYSTEM_IDENTIFIER: Final = (
    "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS system_identifier text NULL"
)


def state_table(outbox: tuple[str, str]) -> tuple[str, str]:
    """``<outbox>_relay_state`` next to the outbox (``public.outbox_relay_state``)."""
    return outbox[0], f"{outbox[1][:50]}_relay_state"


def state_ddl(table: tuple[str, str]) -> sql.Composed:
    """The relay state table (position, resync marker, health report), created or extended."""
    return sql.SQL(STATE_DDL).format(table=qualified(*table))


def state_add_system_identifier(table: tuple[str, str]) -> sql.Composed:
    return sql.SQL(STATE_ADD_SYSTEM_IDENTIFIER).format(table=qualified(*table))


# ---- the app side: the inbox of idempotent consumers -------------------------------


def inbox_ddl(table: tuple[str, str]) -> sql.Composed:
    """CREATE statements for the processed-messages table (idempotent; for init or migrations)."""
    index = sql.Identifier(f"{table[1]}_processed_at"[:63])
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {table} (\n"
        "    message_id   text PRIMARY KEY,\n"
        "    processed_at timestamptz NOT NULL DEFAULT now()\n"
        ");\n"
        "CREATE INDEX IF NOT EXISTS {index} ON {table} (processed_at);\n"
    ).format(table=qualified(*table), index=index)


# ---- everything init creates, as one script ------------------------------------------


def render_sql(
    table: tuple[str, str],
    dead_letter_table: tuple[str, str],
    message_prefix: str,
    *,
    inbox: bool = True,
    layout: str = "cdc-relay",
) -> str:
    """Everything ``init`` creates in SQL, as one script (``init --print-sql``).

    Without ``inbox`` the consumers' processed-messages table is left out: it
    belongs in the consumer's database, which need not be the producer's. With
    ``layout`` "debezium" the outbox has Debezium's columns and no enqueue
    function (its writers insert rows themselves).
    """
    header = (
        "-- Generated by `cdc-relay init --print-sql` for --table "
        f"{'.'.join(table)}; do not edit.\n"
        "-- Apply it from your migrations and run `cdc-relay init --no-table` if you prefer.\n\n"
    )
    parts = [
        outbox_ddl(table, layout),
        dead_letter_ddl(dead_letter_table),
        state_ddl(state_table(table)),
    ]
    if layout != "debezium":
        parts.append(enqueue_function_ddl(table))
    emit_fn = ".".join((table[0], function_names(table)[1]))
    emit_part = (
        "-- Only for emitted messages (outbox_emit): leave this part out unless the application\n"
        "-- emits; the relay asks for logical messages only when the key table exists. Then\n"
        f"-- GRANT EXECUTE ON FUNCTION {emit_fn} TO <the roles that emit>, and SELECT on the\n"
        "-- key table to the relay's role (what `init --grant-emit-to/--grant-to` do).\n"
    )
    emit_part += emit_function_ddl(table, message_prefix).as_string(None).strip() + "\n"
    inbox_part = "-- For idempotent consumers (cdc_relay.inbox.once): the ids they processed.\n"
    inbox_part += inbox_ddl(split_table_name(DEFAULT_INBOX_TABLE)).as_string(None)
    texts = [p.as_string(None).strip() + "\n" for p in parts]
    return header + "\n".join([*texts, emit_part, *([inbox_part] if inbox else [])])

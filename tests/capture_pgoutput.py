"""Capture real pgoutput v1 bytes from a throwaway PostgreSQL 15 into tests/captured_pgoutput.py.

Run manually (not part of the test suite; the tests only read the generated file):

    .venv/bin/python -m tests.capture_pgoutput            # writes tests/captured_pgoutput.py
    .venv/bin/python -m tests.capture_pgoutput -o -       # print instead

What it does (the server comes from ``devtools.postgres``, as in the tests):

1. Start a private PostgreSQL (``wal_level=logical``, ``track_commit_timestamp=on``,
   ``TimeZone=UTC``) in a fresh temp dir on a free 127.0.0.1 port; as root it
   runs as the ``postgres`` OS user. Binaries: ``$PG_BINDIR``, else
   ``$CDC_RELAY_PG_BINDIR``, else /usr/lib/postgresql/15/bin.
2. Create an outbox table, a table with non-ASCII names, an enum in a non-ASCII
   schema (for a Type 'Y' message) and REPLICA IDENTITY FULL, a table with an
   out-of-line TOAST value (for an unchanged-TOAST 'u' value), a publication
   FOR ALL TABLES and a pgoutput slot.
3. Run the scripted transactions (inserts with NULLs and non-ASCII text, updates
   with and without old tuples, deletes 'K' and 'O', truncates, a replayed
   transaction with a replication origin and a pre-2000 commit time, logical
   messages transactional and not), recording server-side facts independently
   of the decoder: relation/type OIDs, xids, commit timestamps.
4. Read the raw payloads with ``pg_logical_slot_peek_binary_changes(...,
   'proto_version', '1', 'publication_names', 'pub', 'messages', 'true')``
   (plain SQL, no replication protocol), once in text mode and once with
   ``'binary', 'true'`` (only its row changes are kept: the rest is identical).
5. Write hex literals plus the expected decoded values. The expected values are
   printed from the current decoder's output, so REVIEW THEM BY HAND against
   the SQL below before committing; the tests also check them against the
   recorded facts. The server is stopped and the temp dir removed at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from cdc_relay.pg.pgoutput import Delete, Insert, Update, decode_message
from devtools.postgres import PostgresServer

PG_BINDIR = Path(
    os.environ.get("PG_BINDIR")
    or os.environ.get("CDC_RELAY_PG_BINDIR")
    or "/usr/lib/postgresql/15/bin"
)
OUTPUT = Path(__file__).with_name("captured_pgoutput.py")
LSN_FIELDS = {"final_lsn", "commit_lsn", "end_lsn", "lsn"}

ID1 = "11111111-2222-3333-4444-555555555555"
ID2 = "22222222-3333-4444-5555-666666666666"
ID2_NEW = "99999999-3333-4444-5555-666666666666"
ID3 = "33333333-4444-5555-6666-777777777777"
ORIGIN_LSN = "0/ABCDEF12"
ORIGIN_TS = "1999-12-31 23:59:58.5+00"  # before the 2000 epoch: a negative commit_ts

SETUP = [
    'CREATE SCHEMA "sché"',
    """CREATE TYPE "sché"."émotion" AS ENUM ('triste', 'heureux')""",
    "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
    " aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,"
    " payload jsonb NOT NULL, headers jsonb NOT NULL DEFAULT '{}', exchange text NULL,"
    " routing_key text NULL, created_at timestamptz NOT NULL DEFAULT now())",
    'CREATE TABLE "tâble" (k int PRIMARY KEY, "ñame" varchar(20), "humeur" "sché"."émotion",'
    " amount numeric(10,2))",
    'ALTER TABLE "tâble" REPLICA IDENTITY FULL',
    "CREATE TABLE doc (id int PRIMARY KEY, body text, n int)",
    "ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL",  # out of line, uncompressed
    "INSERT INTO doc VALUES (1, repeat('x', 3000), 0)",  # before the slot: not captured
    "CREATE PUBLICATION pub FOR ALL TABLES",
    "SELECT pg_create_logical_replication_slot('cap', 'pgoutput')",
    "SELECT pg_replication_origin_create('upstream')",
]

# (label, statements): each runs in one transaction whose xid and commit time are recorded.
TRANSACTIONS: list[tuple[str, list[str]]] = [
    (
        "outbox_insert",
        [
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers,"
            f" created_at) VALUES ('{ID1}', 'order', '42', 'OrderCreated',"
            """ '{"total": 12.5, "name": "Zoë €"}', '{"tenant": "acme"}',"""
            " '2026-11-23 10:11:12.123456+00')"
        ],
    ),
    (
        "multi_insert",
        [
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, exchange,"
            f" routing_key, created_at) VALUES ('{ID2}', 'cliënt', '7', 'Créé', '[1, null, \"ü\"]',"
            " 'events', 'client.créé', '2026-01-02 03:04:05+00')",
            """INSERT INTO "tâble" VALUES (1, 'héllo', 'heureux', 12.5), (2, NULL, NULL, NULL)""",
        ],
    ),
    ("update_full", ["""UPDATE "tâble" SET "ñame" = 'wörld' WHERE k = 1"""]),
    (
        "update_default",
        [
            f"UPDATE outbox SET event_type = 'OrderPaid' WHERE id = '{ID1}'",
            f"UPDATE outbox SET id = '{ID2_NEW}' WHERE id = '{ID2}'",
        ],
    ),
    ("update_toast", ["UPDATE doc SET n = n + 1 WHERE id = 1"]),
    (
        "deletes",
        [f"DELETE FROM outbox WHERE id = '{ID1}'", """DELETE FROM "tâble" WHERE k = 2"""],
    ),
    ("truncate_options", ['TRUNCATE "tâble", doc RESTART IDENTITY CASCADE']),
    ("truncate_plain", ["TRUNCATE outbox"]),
    (
        "origin",
        [
            f"SELECT pg_replication_origin_xact_setup('{ORIGIN_LSN}', '{ORIGIN_TS}')",
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload,"
            f" created_at) VALUES ('{ID3}', 'order', '43', 'OrderReplayed', '{{}}',"
            " '2026-11-23 10:11:12+00')",
        ],
    ),
    ("message", ["SELECT pg_logical_emit_message(true, 'cdc', 'transactional ✓')"]),
    # (an aborted transaction emitting a non-transactional message runs here, see main)
    # Last: a committed transaction flushes the WAL, or peek would not see the
    # unflushed non-transactional message before it.
    ("flush", ["""INSERT INTO "tâble" VALUES (3, 'fin', 'triste', 0)"""]),
]
NON_TRANSACTIONAL = "SELECT pg_logical_emit_message(false, '', '\\x00ff00'::bytea)"

PEEK = (
    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL,"
    " 'proto_version', '1', 'publication_names', 'pub', 'messages', 'true'{extra})"
)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A private PostgreSQL on a free loopback port; yields its DSN.

    The tests' launcher (``devtools.postgres``): it drops root to the server
    user, and its cleanup and watchdog leave no server behind the script.
    """
    os.environ["CDC_RELAY_PG_BINDIR"] = str(PG_BINDIR)
    with PostgresServer(settings={"track_commit_timestamp": "on", "TimeZone": "UTC"}) as server:
        yield server.dsn


def capture(dsn: str) -> dict[str, Any]:
    """Run the script; return server facts plus the text and binary peeks."""
    facts: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        facts["server_version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        for statement in SETUP:
            conn.execute(statement)
        facts["relids"] = {
            name: conn.execute("SELECT %s::regclass::oid::bigint", (f'"{name}"',)).fetchone()[0]  # type: ignore[index]
            for name in ("outbox", "tâble", "doc")
        }
        facts["emotion_oid"] = conn.execute(
            """SELECT '"sché"."émotion"'::regtype::oid::bigint"""
        ).fetchone()[0]  # type: ignore[index]
        transactions = []
        for label, statements in TRANSACTIONS:
            if label == "flush":
                with conn.transaction():
                    conn.execute(NON_TRANSACTIONAL)
                    raise psycopg.Rollback  # roll back: the message is still decoded
            if label == "origin":
                conn.execute("SELECT pg_replication_origin_session_setup('upstream')")
            with conn.transaction():
                xid = conn.execute(
                    "SELECT (pg_current_xact_id()::text::bigint & 4294967295)"
                ).fetchone()[0]  # type: ignore[index]
                for statement in statements:
                    conn.execute(statement)
            if label == "origin":
                conn.execute("SELECT pg_replication_origin_session_reset()")
            commit_ts = conn.execute(
                "SELECT (extract(epoch FROM pg_xact_commit_timestamp(%s::text::xid))"
                " * 1000000)::bigint - 946684800000000",
                (str(xid),),
            ).fetchone()[0]  # type: ignore[index]
            transactions.append((label, xid, commit_ts))
        facts["transactions"] = transactions
        text_rows = conn.execute(PEEK.format(extra="")).fetchall()
        binary_rows = conn.execute(PEEK.format(extra=", 'binary', 'true'")).fetchall()
    # The binary peek differs from the text one only in row data: keep the rows.
    keep = [
        (lsn, data)
        for lsn, data in binary_rows
        if isinstance(decode_message(bytes(data)), Insert | Update | Delete)
    ]
    return {"facts": facts, "text": text_rows, "binary": keep}


def _literal(value: Any, field: str = "") -> str:
    """Python source for a decoded value: LSNs in hex, long repeated bytes folded."""
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        args = ", ".join(
            f"{f.name}={_literal(getattr(value, f.name), f.name)}"
            for f in dataclasses.fields(value)
        )
        return f"{type(value).__name__}({args})"
    if isinstance(value, tuple):
        inner = ", ".join(_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, bytes):
        if len(value) > 32 and value == value[:1] * len(value):
            return f"{value[:1]!r} * {len(value)}"
        with contextlib.suppress(UnicodeDecodeError):
            if not value.isascii():
                return f"{value.decode('utf-8')!r}.encode()"  # reviewable non-ASCII text
    if isinstance(value, int) and not isinstance(value, bool) and field in LSN_FIELDS:
        return f"0x{value:X}"
    return repr(value)


def render(captured: dict[str, Any]) -> str:
    facts = captured["facts"]
    out = [
        f'"""pgoutput v1 payloads captured from PostgreSQL {facts["server_version"]}.',
        "",
        "Generated by tests/capture_pgoutput.py (read its docstring and SQL script);",
        "expected values reviewed by hand. Hex is the exact bytea `data` returned by",
        "pg_logical_slot_peek_binary_changes; `lsn` is that function's lsn column.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import NamedTuple",
        "",
        "from cdc_relay.pg.pgoutput import (",
        "    UNCHANGED_TOAST,",
        "    Begin,",
        "    Binary,",
        "    Column,",
        "    Commit,",
        "    Delete,",
        "    Insert,",
        "    LogicalMessage,",
        "    Origin,",
        "    PgOutputMessage,",
        "    Relation,",
        "    Truncate,",
        "    TypeMessage,",
        "    Update,",
        ")",
        "",
        "",
        "class Captured(NamedTuple):",
        "    lsn: str",
        "    hex: str",
        "    expected: PgOutputMessage",
        "",
        "",
        "# Server-side facts recorded while capturing, independent of the decoder.",
        f"SERVER_VERSION = {facts['server_version']!r}",
        f"RELIDS = {facts['relids']!r}",
        f"EMOTION_TYPE_OID = {facts['emotion_oid']!r}",
        f"ORIGIN_NAME = {'upstream'!r}",
        f"ORIGIN_LSN = {ORIGIN_LSN!r}",
        f"ORIGIN_TS = {ORIGIN_TS!r}",
        "# (label, xid, pg_xact_commit_timestamp as µs since 2000-01-01) per transaction",
        f"TRANSACTIONS = {facts['transactions']!r}",
        "",
    ]
    for name, rows in (("CAPTURED", captured["text"]), ("CAPTURED_BINARY", captured["binary"])):
        out.append(f"{name}: list[Captured] = [")
        for lsn, data in rows:
            raw = bytes(data)
            expected = _literal(decode_message(raw))
            out.append(f"    Captured({lsn!r}, {raw.hex()!r}, {expected}),")
        out.append("]")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default=str(OUTPUT), help="file to write, - = stdout")
    args = parser.parse_args()
    with throwaway_postgres() as dsn:
        source = render(capture(dsn))
    ruff = Path(sys.executable).with_name("ruff")
    if ruff.exists():
        source = subprocess.run(
            [str(ruff), "format", "--stdin-filename", str(OUTPUT), "-"],
            input=source.encode(),
            capture_output=True,
            check=True,
        ).stdout.decode()
    if args.output == "-":
        sys.stdout.write(source)
    else:
        Path(args.output).write_text(source, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Regenerate tests/captured_pgoutput.py from a real server.

    .venv/bin/python -m tests.capture_pgoutput > tests/captured_pgoutput.py

Starts a throwaway Postgres, runs a scripted set of statements against a
publication FOR ALL TABLES, and dumps the raw pgoutput payloads that
``pg_logical_slot_peek_binary_changes`` returns, as hex.
"""

from __future__ import annotations

import psycopg

from cdc_relay.devservers import PostgresServer

SCRIPT = [
    "CREATE TYPE mood AS ENUM ('sad', 'happy')",
    "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
    " aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,"
    " payload jsonb NOT NULL, headers jsonb NOT NULL DEFAULT '{}', exchange text NULL,"
    " routing_key text NULL, created_at timestamptz NOT NULL DEFAULT now())",
    'CREATE TABLE "tâble" (k int PRIMARY KEY, "ñame" text, m mood)',
    'ALTER TABLE "tâble" REPLICA IDENTITY FULL',
    "CREATE PUBLICATION cap FOR ALL TABLES",
    "SELECT pg_create_logical_replication_slot('cap', 'pgoutput')",
    "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers,"
    " created_at) VALUES ('11111111-2222-3333-4444-555555555555', 'order', '42',"
    ' \'OrderCreated\', \'{"total": 12.5, "name": "Zoë €"}\', \'{"tenant": "acme"}\','
    " '2026-11-23 10:11:12.123456+00')",
    "BEGIN; INSERT INTO \"tâble\" VALUES (1, 'héllo', 'happy'), (2, NULL, NULL); COMMIT",
    'UPDATE "tâble" SET "ñame" = \'wörld\' WHERE k = 1',
    'DELETE FROM "tâble" WHERE k = 2',
    'TRUNCATE "tâble"',
    "SELECT pg_logical_emit_message(true, 'cdc', 'transactional ✓')",
    "SELECT pg_logical_emit_message(false, 'cdc', 'not transactional')",
]


def main() -> None:
    with PostgresServer() as pg, psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for statement in SCRIPT:
            conn.execute(statement)
        rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'cap', 'messages', 'true')"
        ).fetchall()
    print('"""Raw pgoutput v1 payloads captured by tests/capture_pgoutput.py (PostgreSQL 15)."""')
    print()
    print("CAPTURED: list[tuple[str, str]] = [")
    for lsn, data in rows:
        print(f'    ("{lsn}", "{bytes(data).hex()}"),')
    print("]")


if __name__ == "__main__":
    main()

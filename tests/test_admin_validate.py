"""pg.checks.validate: the facts a session starts from, and each refusal as one line."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.lsn import Lsn
from cdc_relay.pg import checks
from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import function_names
from tests.harness import Setup, unique_names


@pytest.fixture
def outbox(pg_dsn: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("val"))
    setup.init()
    yield setup
    setup.cleanup()


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        yield connection


def refused(conn: psycopg.Connection[Any], settings: Settings, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        checks.validate(conn, settings)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_startup_facts(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    facts = checks.validate(conn, outbox.settings)
    row = conn.execute(
        "SELECT %s::regclass::oid::bigint, confirmed_flush_lsn::text"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (outbox.table, outbox.names["slot"]),
    ).fetchone()
    assert row is not None
    assert facts.outbox_relid == row[0]
    assert facts.confirmed_flush_lsn == Lsn.parse(row[1])
    assert type(facts.confirmed_flush_lsn) is int


def test_two_phase_slot_refused(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    slot = outbox.names["slot"] + "_2pc"
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, true)", (slot,))
    try:
        settings = Settings(**{**outbox.names, "slot": slot}, dsn=outbox.dsn)
        refused(conn, settings, "two_phase", slot)
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def test_non_utf8_database_refused(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    db = f"ascii_{uuid.uuid4().hex[:8]}"
    conn.execute(
        f"CREATE DATABASE {db} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )
    try:
        with psycopg.connect(make_conninfo(outbox.dsn, dbname=db), autocommit=True) as other:
            refused(other, outbox.settings, "SQL_ASCII", "UTF8")
    finally:
        conn.execute(f"DROP DATABASE {db}")


def test_renamed_optional_column_refused(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"ALTER TABLE {outbox.table} RENAME COLUMN routing_key TO rk")
    refused(conn, outbox.settings, "lacks column(s) routing_key", "renamed")


def test_generated_mapped_column_refused(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    """pgoutput never sends a generated column: its values would be silently ignored."""
    conn.execute(f"ALTER TABLE {outbox.table} DROP COLUMN routing_key")
    conn.execute(
        f"ALTER TABLE {outbox.table} ADD COLUMN routing_key text"
        " GENERATED ALWAYS AS ('rk.' || event_type) STORED"
    )
    refused(conn, outbox.settings, "generated column(s) routing_key", "logical replication")


def test_an_unmapped_generated_column_is_fine(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        f"ALTER TABLE {outbox.table} ADD COLUMN note text GENERATED ALWAYS AS (event_type) STORED"
    )
    checks.validate(conn, outbox.settings)


def test_partitioned_outbox_needs_publish_via_root(pg_dsn: str) -> None:
    names = unique_names("part")
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", names)
    table = names["table"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id uuid NOT NULL DEFAULT gen_random_uuid(),"
            " aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,"
            " payload jsonb NOT NULL, headers jsonb NOT NULL DEFAULT '{}', exchange text,"
            " routing_key text, created_at timestamptz NOT NULL DEFAULT now())"
            " PARTITION BY RANGE (created_at)"
        )
        conn.execute(f"CREATE TABLE {table}_p PARTITION OF {table} DEFAULT")
        try:
            pg_setup.init(conn, setup.settings, create_table=False)
            checks.validate(conn, setup.settings)  # init publishes via the root
            pub = names["publication"]
            conn.execute(f"ALTER PUBLICATION {pub} SET (publish_via_partition_root = false)")
            refused(conn, setup.settings, "partitioned", "publish_via_partition_root = true")
        finally:
            setup.cleanup()


def test_row_filter_refused(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    pub = outbox.names["publication"]
    conn.execute(f"ALTER PUBLICATION {pub} SET TABLE {outbox.table} WHERE (event_type <> 'x')")
    refused(conn, outbox.settings, "row filter or column list")


def test_missing_dead_letter_table_refused(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"DROP TABLE {outbox.table}_dead_letter")
    refused(conn, outbox.settings, "dead-letter table", "does not exist", "cdc-relay init")


def test_old_uuid_dead_letter_table_is_refused_then_migrated(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    dl = f"{outbox.table}_dead_letter"
    conn.execute(f"DROP TABLE {dl}")
    conn.execute(  # the table as init created it before outbox_id became text
        f"CREATE TABLE {dl} (id bigserial PRIMARY KEY, outbox_id uuid NOT NULL,"
        " reason text NOT NULL, row_data jsonb NOT NULL, lsn pg_lsn NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(), replayed_at timestamptz NULL)"
    )
    conn.execute(
        f"INSERT INTO {dl} (outbox_id, reason, row_data, lsn)"
        " VALUES ('00000000-0000-0000-0000-000000000001', 'old', '{}', '0/1')"
    )
    refused(conn, outbox.settings, "outbox_id uuid", "migrate")
    report = pg_setup.init(conn, outbox.settings)
    assert any("migrated outbox_id from uuid to text" in line for line in report), report
    checks.validate(conn, outbox.settings)
    assert conn.execute(f"SELECT outbox_id FROM {dl}").fetchall() == [
        ("00000000-0000-0000-0000-000000000001",)
    ]
    again = pg_setup.init(conn, outbox.settings)
    assert not any("migrated" in line for line in again), again


def test_init_is_idempotent_including_functions(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    report = pg_setup.init(conn, outbox.settings)
    assert all("already exists" in line for line in report), report
    enqueue, emit = function_names(outbox.settings.table_parts)
    assert f"function public.{enqueue}: already exists" in report
    assert not any(emit in line for line in report), report  # only where asked for
    pg_setup.init(conn, outbox.settings, emit=True)
    again = pg_setup.init(conn, outbox.settings)  # once asked for, it stays
    assert all("already exists" in line for line in again), again
    assert f"function public.{emit}: already exists" in again


def test_init_refuses_an_invalid_slot_name(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    settings = Settings(**{**outbox.names, "slot": "Bad-Slot"}, dsn=outbox.dsn)
    with pytest.raises(ConfigError, match="invalid --slot 'Bad-Slot'"):
        pg_setup.init(conn, settings)


def test_init_adds_a_recreated_outbox_to_its_publication(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    """Issue 16: after DROP TABLE outbox, init said "publication: already exists" and
    left the new table out of it, so its rows were never published."""
    conn.execute(f"DROP TABLE {outbox.table}")
    report = pg_setup.init(conn, outbox.settings)
    pub, table = outbox.settings.publication, outbox.table
    assert f"publication {pub}: added {table} (the publication did not cover it)" in report
    checks.validate(conn, outbox.settings)
    again = pg_setup.init(conn, outbox.settings)
    assert f"publication {pub}: already exists" in again


def test_init_names_the_statement_when_it_may_not_add_the_outbox(
    outbox: Setup, conn: psycopg.Connection[Any], pg_dsn: str
) -> None:
    pub, (_, table) = outbox.settings.publication, outbox.settings.table_parts
    role = f"{table}_owner"
    conn.execute(f"ALTER PUBLICATION {pub} DROP TABLE {table}")
    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        conn.execute(f"ALTER TABLE {table} OWNER TO {role}")
        dsn = make_conninfo(pg_dsn, user=role, password="pw")
        with psycopg.connect(dsn, autocommit=True) as owner, pytest.raises(ConfigError) as info:
            pg_setup._cover_outbox(owner, outbox.settings, tableless=False)
        assert str(info.value) == (
            f"publication {pub} does not cover public.{table} and this role may not add it: "
            f'run ALTER PUBLICATION "{pub}" ADD TABLE "public"."{table}" as the '
            "publication's owner"
        )
    finally:
        conn.execute(f"ALTER TABLE {table} OWNER TO CURRENT_USER")
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
        conn.execute(f"DROP ROLE {role}")

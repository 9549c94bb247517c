"""`cdc-relay init` creates the inbox table idempotent consumers use, unless --no-inbox."""

from __future__ import annotations

import uuid

import psycopg
from psycopg.conninfo import make_conninfo

from cdc_relay import inbox
from tests.harness import Setup, run_cli, unique_names


def test_init_creates_the_processed_messages_table_and_says_so_the_second_time(
    outbox: Setup,
) -> None:
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s)::text", (inbox.DEFAULT_TABLE,)).fetchone()
    assert row is not None and row[0] == "processed_messages"
    lines = outbox.init()
    assert f"table {inbox.DEFAULT_TABLE}: already exists (for idempotent consumers)" in lines
    with psycopg.connect(outbox.dsn) as conn:
        with inbox.once(conn, f"init-test-{outbox.names['slot']}") as first:
            assert first
        with inbox.once(conn, f"init-test-{outbox.names['slot']}") as first:
            assert not first


def test_init_no_inbox_leaves_processed_messages_to_the_consumers(
    pg_dsn: str, amqp_url: str
) -> None:
    """The producer's database gets no consumer table; --print-sql leaves it out too."""
    database = f"noinbox_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    dsn = make_conninfo(pg_dsn, dbname=database)
    setup = Setup(dsn, amqp_url, unique_names("noinbox"))
    try:
        done = run_cli("init", "--no-inbox", "--no-exchange", *setup.cli_args("init"))
        assert done.returncode == 0, done.stderr
        assert inbox.DEFAULT_TABLE not in done.stdout, done.stdout
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (inbox.DEFAULT_TABLE,)).fetchone()
            outbox = conn.execute("SELECT to_regclass(%s)", (setup.table,)).fetchone()
        assert row == (None,) and outbox is not None and outbox[0] is not None
        script = run_cli("init", "--no-inbox", "--print-sql", *setup.cli_args("init"))
        assert script.returncode == 0 and "CREATE TABLE" in script.stdout, script.stderr
        assert "processed_messages" not in script.stdout
        full = run_cli("init", "--print-sql", *setup.cli_args("init"))
        assert '"processed_messages"' in full.stdout
    finally:
        setup.cleanup()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

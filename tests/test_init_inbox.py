"""`cdc-relay init` also creates the inbox table idempotent consumers use (issue 12)."""

from __future__ import annotations

import psycopg

from cdc_relay import inbox
from tests.harness import Setup


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

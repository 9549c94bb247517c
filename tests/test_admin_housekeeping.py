"""prune, dead-letters prune, drop, and the enqueue/emit SQL functions init creates."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

from cdc_relay import emitauth
from cdc_relay.pg import catalog, checks
from cdc_relay.pg import setup as pg_setup
from cdc_relay.schema import function_names
from tests.harness import Setup, unique_names
from tests.harness import run_cli as cli


@pytest.fixture
def outbox(pg_dsn: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("hk"))
    setup.init()
    yield setup
    setup.cleanup()


@pytest.fixture
def conn(outbox: Setup) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(outbox.dsn, autocommit=True) as connection:
        yield connection


def test_prune_deletes_only_old_rows_in_batches(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    conn.execute(
        f"INSERT INTO {outbox.table} (aggregate_type, aggregate_id, event_type, payload,"
        " created_at) SELECT 'a', i::text, 'e', '{}', now() - i * interval '1 hour'"
        " FROM generate_series(1, 50) AS i"
    )
    result = cli("prune", "--older-than", "90m", "--batch", "7", *outbox.cli_args("prune"))
    assert result.returncode == 0, result.stderr
    assert "deleted 49 outbox row(s)" in result.stdout
    # Not on a terminal: no line per batch, one summary with the rate.
    (summary,) = result.stderr.splitlines()
    assert summary.startswith("deleted 49 outbox row(s) in ") and summary.endswith("/s)"), summary
    left = conn.execute(f"SELECT aggregate_id FROM {outbox.table}").fetchall()
    assert left == [("1",)]
    again = cli("prune", "--older-than", "90m", *outbox.cli_args("prune"))
    assert "deleted 0 outbox row(s)" in again.stdout


@pytest.mark.parametrize("value", ["7", "1w", "-1d", "1.5h", "", "d"])
def test_prune_refuses_bad_durations(value: str) -> None:
    result = cli("prune", "--older-than", value)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--older-than" in result.stderr


def test_dead_letters_prune(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    dl = f"{outbox.table}_dead_letter"
    conn.execute(
        f"INSERT INTO {dl} (outbox_id, reason, row_data, lsn, created_at, replayed_at)"
        " SELECT 'id' || i, 'r', '{}', '0/1', now() - i * interval '1 day',"
        " CASE WHEN i % 2 = 0 THEN now() END FROM generate_series(1, 10) AS i"
    )
    kept = cli(
        "dead-letters", "prune", "--older-than", "3d", *outbox.cli_args("dead-letters prune")
    )
    assert kept.returncode == 0, kept.stderr
    assert "deleted 4 dead letter(s)" in kept.stdout  # replayed: 4, 6, 8, 10
    everything = cli(
        "dead-letters",
        "prune",
        "--older-than",
        "3d",
        "--include-pending",
        *outbox.cli_args("dead-letters prune"),
    )
    assert "deleted 4 dead letter(s)" in everything.stdout  # pending: 3, 5, 7, 9
    left = conn.execute(f"SELECT outbox_id FROM {dl} ORDER BY id").fetchall()
    assert left == [("id1",), ("id2",)]


def test_drop_with_publication(outbox: Setup, conn: psycopg.Connection[Any]) -> None:
    result = cli("drop", "--drop-publication", "--yes", *outbox.cli_args("drop"))
    assert result.returncode == 0, result.stderr
    assert f"replication slot {outbox.names['slot']}: dropped" in result.stdout
    assert f"publication {outbox.names['publication']}: dropped" in result.stdout
    assert "resync" not in result.stdout  # the slot held no outbox row: nothing to republish
    assert catalog.slot_info(conn, outbox.names["slot"]) is None


def test_drop_refuses_a_slot_holding_unpublished_rows(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    """Rows committed after the slot's confirmed position are lost with it: not by accident."""
    slot = outbox.names["slot"]
    with conn.transaction():
        outbox.insert(conn, [{"aggregate_id": i} for i in range(3)])
    assert outbox.confirmed_lag() > 0
    refused = cli("drop", "--yes", *outbox.cli_args("drop"))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"refusing to drop replication slot {slot}: it holds 3 outbox row(s)" in refused.stderr
    assert "--force" in refused.stderr and refused.stdout == ""
    assert catalog.slot_info(conn, slot) is not None

    unconfirmed = cli("drop", "--force", *outbox.cli_args("drop"))  # not a terminal: --yes required
    assert unconfirmed.returncode == 2, unconfirmed.stderr
    assert "--yes" in unconfirmed.stderr and unconfirmed.stderr.count("\n") == 1
    assert catalog.slot_info(conn, slot) is not None

    dropped = cli("drop", "--force", "--yes", *outbox.cli_args("drop"))
    assert dropped.returncode == 0, dropped.stderr
    assert f"replication slot {slot}: dropped" in dropped.stdout
    assert f"to republish what the slot held: cdc-relay resync --slot {slot} --since" in (
        dropped.stdout
    )
    assert catalog.slot_info(conn, slot) is None


def test_drop_refuses_an_attached_relay_unless_forced(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    """--force ends the walsender's connection (a relay would stop), then drops."""
    slot = outbox.names["slot"]
    stream = psycopg.connect(outbox.dsn, replication="database", autocommit=True)
    try:
        stream.pgconn.send_query(
            f"START_REPLICATION SLOT {slot} LOGICAL 0/0"
            f" (proto_version '1', publication_names '{outbox.names['publication']}')".encode()
        )
        for _ in range(50):
            info = catalog.slot_info(conn, slot)
            if info is not None and info.active:
                break
            time.sleep(0.1)
        assert info is not None and info.active
        refused = cli("drop", "--yes", *outbox.cli_args("drop"))
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"in use by a relay (walsender pid {info.active_pid})" in refused.stderr
        assert catalog.slot_info(conn, slot) is not None
        dropped = cli("drop", "--force", "--yes", *outbox.cli_args("drop"))
        assert dropped.returncode == 0, dropped.stderr
        assert f"replication slot {slot}: dropped" in dropped.stdout
        assert catalog.slot_info(conn, slot) is None
        gone = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (info.active_pid,)
        ).fetchone()
        assert gone == (0,)
    finally:
        stream.close()


def test_drop_of_a_slot_whose_wal_holds_no_outbox_row_needs_no_force(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    """WAL of other tables is not a loss: only the publication's changes count."""
    other = f"{outbox.table}_other"
    conn.execute(f"CREATE TABLE {other} (x int)")
    conn.execute(f"INSERT INTO {other} SELECT generate_series(1, 100)")
    conn.execute(f"DROP TABLE {other}")
    assert outbox.confirmed_lag() > 0
    dropped = cli("drop", "--yes", *outbox.cli_args("drop"))
    assert dropped.returncode == 0, dropped.stderr
    assert catalog.slot_info(conn, outbox.names["slot"]) is None


def test_enqueue_function_inserts_an_outbox_row(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    enqueue, _ = function_names(outbox.settings.table_parts)
    row = conn.execute(
        f"SELECT public.{enqueue}('order', '42', 'OrderCreated', '{{\"total\": 5}}')"
    ).fetchone()
    assert row is not None and isinstance(row[0], uuid.UUID)
    with_all = conn.execute(
        f"SELECT public.{enqueue}('order', '43', 'OrderPaid', '{{}}', '{{\"h\": 1}}',"
        " 'billing', 'order.paid')"
    ).fetchone()
    assert with_all is not None
    rows = conn.execute(
        f"SELECT id, aggregate_id, event_type, payload, headers, exchange, routing_key"
        f" FROM {outbox.table} ORDER BY aggregate_id"
    ).fetchall()
    assert rows == [
        (row[0], "42", "OrderCreated", {"total": 5}, {}, None, None),
        (with_all[0], "43", "OrderPaid", {}, {"h": 1}, "billing", "order.paid"),
    ]


def test_emit_function_writes_a_transactional_logical_message(
    outbox: Setup, conn: psycopg.Connection[Any]
) -> None:
    pg_setup.init(conn, outbox.settings, emit=True)
    _, emit = function_names(outbox.settings.table_parts)
    key = checks.read_emit_key(conn, outbox.settings)
    assert key is not None
    slot = f"td_{uuid.uuid4().hex[:8]}"
    # not temporary: Postgres drops a temporary slot on any error in its session
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
    try:
        with conn.transaction():
            row = conn.execute(
                f"SELECT public.{emit}('order', '42', 'OrderCreated', '{{\"total\": 5}}',"
                " NULL, NULL, 'r.k')"
            ).fetchone()
        assert row is not None
        with pytest.raises(psycopg.errors.RaiseException), conn.transaction():
            conn.execute(f"SELECT public.{emit}('order', '0', 'RolledBack', '{{}}')")
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'rollback'; END $$")
        changes = [
            r[0]
            for r in conn.execute(
                "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,)
            ).fetchall()
        ]
    finally:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    messages = [c for c in changes if c.startswith("message:")]
    assert len(messages) == 1, changes  # the rolled-back one was never decoded
    assert "transactional: 1 prefix: cdc_relay" in messages[0]
    content = messages[0].split("content:", 1)[1].encode()
    signed = emitauth.authenticated(content, key)  # the emit function signs with the key
    assert signed is not None and emitauth.authenticated(content, bytes(64)) is None
    body = orjson.loads(signed)
    assert body["id"] == str(row[0])
    assert (body["aggregate_type"], body["aggregate_id"], body["event_type"]) == (
        "order",
        "42",
        "OrderCreated",
    )
    # payload and headers travel as jsonb text: the relay's body is what a table row gives
    assert body["payload"] == '{"total": 5}' and body["headers"] == "{}"
    assert body["exchange"] is None and body["routing_key"] == "r.k"
    assert body["created_at"]


def test_default_table_gets_the_documented_function_names() -> None:
    assert function_names(("public", "outbox")) == ("outbox_enqueue", "outbox_emit")

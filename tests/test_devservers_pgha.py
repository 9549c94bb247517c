"""A PostgreSQL 17 primary and standby (issue 11): a failover slot is synced and survives
promotion, and the multi-host DSN follows the new primary."""

from __future__ import annotations

import psycopg
import pytest

from devtools.pgha import PostgresPair


@pytest.mark.timeout(240)
def test_failover_slot_synced_to_standby_and_kept_after_promotion(pg_pair: PostgresPair) -> None:
    pair = pg_pair
    with psycopg.connect(pair.primary.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot('fo', 'pgoutput', false, false, true)"
        )
        assert conn.execute(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'fo'"
        ).fetchone() == (True,)
        assert conn.execute("SHOW synchronized_standby_slots").fetchone() == (pair.standby_slot,)
    with psycopg.connect(pair.standby.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        (conninfo,) = conn.execute("SHOW primary_conninfo").fetchone() or ("",)
        assert "dbname=postgres" in conninfo
    pair.wait_synced("fo", timeout=90)
    with psycopg.connect(pair.standby.dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT synced, temporary, failover FROM pg_replication_slots WHERE slot_name = 'fo'"
        ).fetchone() == (True, False, True)

    pair.failover()
    with psycopg.connect(pair.dsn, autocommit=True, connect_timeout=10) as conn:
        assert conn.info.port == pair.standby.port
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert conn.execute(
            "SELECT synced, temporary FROM pg_replication_slots WHERE slot_name = 'fo'"
        ).fetchone() == (True, False)

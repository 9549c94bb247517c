"""Issue 11: `init --failover` and the failover parts of `status` on one PostgreSQL 17 server.

The warnings name each way a failover slot on a primary can still go wrong:
no ``synchronized_standby_slots`` (phantom events after a promotion), or a
standby slot there that is missing or not streaming (the relay receives nothing).
"""

from __future__ import annotations

import psycopg
import pytest

from cdc_relay.pg import report as pg_report
from cdc_relay.pg import setup as pg_setup
from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory
from tests.harness import Setup, unique_names

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def pg17(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory(version=17)


def test_failover_slot_status_warnings(pg17: PostgresServer, amqp_url: str) -> None:
    setup = Setup(pg17.dsn, amqp_url, unique_names("hast"))
    with psycopg.connect(pg17.dsn, autocommit=True) as conn:
        report = pg_setup.init(conn, setup.settings, failover=True)
        assert any(line.endswith("(failover)") for line in report), report
        status = pg_report.status(conn, setup.settings, require_active=False).as_dict()
        assert (status["role"], status["failover"], status["healthy"]) == ("primary", True, True)
        assert status["active_client"] is None
        [warning] = status["warnings"]
        assert "synchronized_standby_slots is empty" in warning
        assert "phantom events" in warning

        conn.execute("SELECT pg_create_physical_replication_slot('standby_x')")
        conn.execute("ALTER SYSTEM SET synchronized_standby_slots = 'standby_x'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("SELECT pg_sleep(0.2)")
        [warning] = pg_report.status(conn, setup.settings, require_active=False).as_dict()[
            "warnings"
        ]
        assert "standby slot standby_x (synchronized_standby_slots) is not active" in warning
        conn.execute("ALTER SYSTEM RESET synchronized_standby_slots")
        conn.execute("SELECT pg_reload_conf()")


def test_failover_asked_for_an_existing_plain_slot(pg17: PostgresServer, amqp_url: str) -> None:
    setup = Setup(pg17.dsn, amqp_url, unique_names("hast"))
    with psycopg.connect(pg17.dsn, autocommit=True) as conn:
        pg_setup.init(conn, setup.settings)
        status = pg_report.status(conn, setup.settings, require_active=False).as_dict()
        assert status["failover"] is False and status["warnings"] == []
        report = pg_setup.init(conn, setup.settings, failover=True)
        [line] = [line for line in report if line.startswith("replication slot")]
        assert "exists WITHOUT failover" in line
        assert f"ALTER_REPLICATION_SLOT {setup.names['slot']} (FAILOVER true)" in line

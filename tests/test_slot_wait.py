"""``init`` and ``resync`` say which transactions their slot creation waits for.

Own server (max_prepared_transactions > 0), a real open transaction and a real
prepared one; the commands run as child processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory
from tests.harness import Setup, unique_names

pytestmark = [pytest.mark.asyncio]


@pytest.fixture(scope="module")
def pg_prepared(pg_factory: ServerFactory[PostgresServer]) -> PostgresServer:
    return pg_factory(settings={"max_prepared_transactions": "5"})


def child(setup: Setup, log: Path, *args: str) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cdc_relay.cli", *args, *setup.cli_args()],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


async def wait_for(log: Path, text: str, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.1)


def hold(dsn: str, gid: str) -> tuple[psycopg.Connection[object], int]:
    """A prepared transaction ``gid`` and an open transaction with an xid (its pid returned)."""
    with psycopg.connect(dsn) as prep:
        prep.execute("SELECT txid_current()")
        prep.execute(f"PREPARE TRANSACTION '{gid}'")
    open_ = psycopg.connect(dsn)
    open_.execute("SELECT txid_current()")
    return open_, open_.info.backend_pid


async def test_init_and_resync_name_the_transactions_they_wait_for(
    pg_prepared: PostgresServer, amqp_url: str, tmp_path: Path
) -> None:
    setup = Setup(pg_prepared.dsn, amqp_url, unique_names("sw"))
    try:
        blocking, pid = hold(setup.dsn, "sw-gid-1")
        init = child(setup, tmp_path / "init.log", "init")
        try:
            await wait_for(tmp_path / "init.log", f"pid {pid} (idle in transaction", init, 20)
            assert "prepared transaction 'sw-gid-1'" in (tmp_path / "init.log").read_text()
            blocking.rollback()
            with psycopg.connect(setup.dsn, autocommit=True) as conn:
                conn.execute("ROLLBACK PREPARED 'sw-gid-1'")
            assert await asyncio.to_thread(init.wait, 30) == 0, (tmp_path / "init.log").read_text()
        finally:
            blocking.close()
            if init.poll() is None:
                init.kill()
                init.wait()
        assert "created at" in (tmp_path / "init.log").read_text()

        with psycopg.connect(setup.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (setup.names["slot"],))
        blocking, pid = hold(setup.dsn, "sw-gid-2")
        resync = child(setup, tmp_path / "resync.log", "resync", "--since", "2000-01-01")
        try:
            await wait_for(tmp_path / "resync.log", f"pid {pid} (idle in transaction", resync, 20)
            blocking.rollback()
            with psycopg.connect(setup.dsn, autocommit=True) as conn:
                conn.execute("ROLLBACK PREPARED 'sw-gid-2'")
            done = await asyncio.to_thread(resync.wait, 60)
            assert done == 0, (tmp_path / "resync.log").read_text()
        finally:
            blocking.close()
            if resync.poll() is None:
                resync.kill()
                resync.wait()
        assert "resync done: 0 row(s)" in (tmp_path / "resync.log").read_text()
    finally:
        setup.cleanup()

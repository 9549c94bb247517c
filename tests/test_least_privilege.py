"""The relay with the least it needs on both servers (issue 10), as docs/operations.md says.

Postgres: a ``LOGIN REPLICATION`` role given only what ``init --grant-to`` grants.
RabbitMQ: a user with write permission on the events exchange and nothing else (no
configure, no read), so the relay runs with ``--no-declare``. Each test checks a line
of the documentation: what works, and what fails with one clear line.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_relay.config import Settings
from cdc_relay.errors import EX_CONFIG
from devtools.procs import free_port
from devtools.rabbit import RabbitServer
from tests.harness import Consumer, RelayProcess, Setup, run_cli, unique_names, wait_until

pytestmark = pytest.mark.integration

MQ_PASSWORD = f"r@bb#it/{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class LeastPrivilege:
    setup: Setup  # the admin's view: DSN, guest URL, names
    role: str
    mq_user: str
    mq_url: str  # the relay's own RabbitMQ user

    @property
    def role_dsn(self) -> str:
        return make_conninfo(self.setup.dsn, user=self.role)

    def settings(self) -> Settings:
        return Settings(dsn=self.role_dsn, amqp_urls=[self.mq_url], **self.setup.names)


def cli(*args: str) -> tuple[int, str, str]:
    result = run_cli(*args, timeout=90)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def least(pg_dsn: str, rabbit_server: RabbitServer) -> Iterator[LeastPrivilege]:
    setup = Setup(pg_dsn, rabbit_server.amqp_url, unique_names("least"))
    tag = uuid.uuid4().hex[:6]
    role, mq_user = f"relay_least_{tag}", f"relay_{tag}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    code, _, err = cli("init", "--grant-to", role, *setup.cli_args("init"))
    assert code == 0, err
    rabbit_server.ctl("add_user", mq_user, MQ_PASSWORD)
    exchange = setup.names["exchange"]
    rabbit_server.ctl("set_permissions", "-p", "/", mq_user, "^$", f"^{exchange}$", "^$")
    mq_url = f"amqp://{mq_user}:{quote(MQ_PASSWORD, safe='')}@127.0.0.1:{rabbit_server.port}/"
    yield LeastPrivilege(setup, role, mq_user, mq_url)
    setup.cleanup()
    rabbit_server.ctl("delete_user", mq_user)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_role_has_exactly_the_documented_privileges(least: LeastPrivilege) -> None:
    """What docs/operations.md lists, and nothing on the outbox table itself."""
    schema, table = least.setup.table.split(".")
    with psycopg.connect(least.setup.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants"
            " WHERE grantee = %s ORDER BY 1, 2",
            (least.role,),
        ).fetchall()
        attrs = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin"
            " FROM pg_roles WHERE rolname = %s",
            (least.role,),
        ).fetchone()
        seq_usage = conn.execute(
            "SELECT object_schema, object_name FROM information_schema.usage_privileges"
            " WHERE grantee = %s AND object_type = 'SEQUENCE'",
            (least.role,),
        ).fetchall()
        owns = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles"
            " WHERE rolname = %s)",
            (least.role,),
        ).fetchone()
    dead, state = f"{table}_dead_letter", f"{table}_relay_state"
    assert rows == [(t, p) for t in (dead, state) for p in ("INSERT", "SELECT", "UPDATE")]
    assert attrs == (False, False, False, True, True)
    assert seq_usage == [(schema, f"{dead}_id_seq")]
    assert owns == (0,)


@pytest.mark.asyncio
async def test_run_with_least_privilege_on_both_servers(
    least: LeastPrivilege, tmp_path: Path
) -> None:
    setup = least.setup
    consumer = await Consumer(setup.amqp_url, setup.names["exchange"], "order.#").start()
    relay = RelayProcess(
        least.settings(), tmp_path / "relay.log", "--no-declare", metrics_port=free_port()
    )
    relay.start()
    try:
        await relay.wait_ready(60)
        with psycopg.connect(setup.dsn) as conn:
            good = setup.insert(conn, [{"aggregate_id": i} for i in range(3)])
            (unroutable,) = setup.insert(conn, [{"aggregate_type": "nobody"}])
            (forbidden,) = setup.insert(conn, [{"exchange": "amq.topic"}])
            good += setup.insert(conn, [{"aggregate_id": 9}])
        await consumer.wait_for(set(good), timeout=30)
        args = ["--dsn", least.role_dsn, *setup.cli_args("status")[2:]]
        list_args = ["--dsn", least.role_dsn, *setup.cli_args("dead-letters list")[2:]]

        def letters() -> dict[str, str]:
            code, out, err = cli("dead-letters", "list", "--json", *list_args)
            assert code == 0, err
            records = [orjson.loads(line) for line in out.splitlines()]
            return {r["outbox_id"]: r["reason"] for r in records}

        assert await wait_until(lambda: len(letters()) == 2, 30, 0.5), relay.log_tail()
        reasons = letters()
        assert "NO_ROUTE" in reasons[unroutable]
        assert "ACCESS_REFUSED" in reasons[forbidden], reasons
        code, out, err = cli("status", *args)
        assert code == 0, out + err
    finally:
        code = relay.stop()
        await consumer.close()
    assert code == 0, relay.log_tail()
    # The refused publish closed the channel: the session restarted and replayed (at least once).
    assert set(consumer.ids()) == set(good)
    assert "ACCESS_REFUSED" in relay.log()
    assert MQ_PASSWORD not in relay.log() and quote(MQ_PASSWORD, safe="") not in relay.log()


def test_declaring_without_configure_permission_is_one_line(least: LeastPrivilege) -> None:
    """The default --declare needs configure on the exchange: say so, exit 78, no retry loop."""
    settings = least.settings()
    args = ["--dsn", settings.dsn, "--amqp-url", least.mq_url, *least.setup.cli_args()[4:]]
    code, out, err = cli("run", *args)
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == EX_CONFIG, err
    assert len(lines) == 1 and lines[0].startswith("cdc-relay: error: "), err
    assert "ACCESS_REFUSED" in lines[0] and "--no-declare" in lines[0], lines[0]
    assert MQ_PASSWORD not in out + err


def test_admin_only_commands_say_what_is_missing(least: LeastPrivilege) -> None:
    """prune deletes outbox rows: not the relay role's job (an admin or the app does it)."""
    args = ["--dsn", least.role_dsn, *least.setup.cli_args("prune")[2:]]
    code, _, err = cli("prune", "--older-than", "7d", *args)
    assert code == EX_CONFIG, err
    assert "permission denied" in err and "--grant-to" in err, err
    assert err.count("\n") == 1, err


def test_rds_replication_membership_counts_as_replication(pg_dsn: str) -> None:
    """Amazon RDS/Aurora have no REPLICATION attribute for ordinary roles: membership in
    ``rds_replication`` is what lets a role stream. ``init --grant-to`` must not tell such
    a role it lacks LOGIN REPLICATION (simulated with a role of that name)."""
    setup = Setup(pg_dsn, "amqp://unused@127.0.0.1:1/", unique_names("rds"))
    tag = uuid.uuid4().hex[:6]
    member, plain = f"relay_rds_{tag}", f"relay_norepl_{tag}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN CREATE ROLE rds_replication; EXCEPTION WHEN duplicate_object"
            " THEN NULL; END $$"
        )
        for role in (member, plain):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT rds_replication TO {}").format(sql.Identifier(member)))
    try:
        setup.init()
        for role, warned in ((member, False), (plain, True)):
            code, out, err = cli(
                "init", "--no-exchange", "--grant-to", role, *setup.cli_args("init")
            )
            assert code == 0, err
            assert ("also needs LOGIN REPLICATION" in out) is warned, out
    finally:
        setup.cleanup()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for role in (member, plain):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))

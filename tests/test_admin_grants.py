"""init --grant-to: a LOGIN REPLICATION role gets exactly what run, status, dead-letters need."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import orjson
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdc_relay.deadletters import DeadLetter, DeadLetterWriter, list_dead_letters
from cdc_relay.errors import EX_CONFIG, ConfigError
from cdc_relay.pg import catalog, checks
from cdc_relay.pg import setup as pg_setup
from tests.harness import Setup
from tests.harness import run_cli as cli


@pytest.fixture
def role(outbox: Setup) -> Iterator[str]:
    name = f"relay_role_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN REPLICATION")
    yield name
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE {name}")


def as_role(setup: Setup, role: str, command: str = "status") -> list[str]:
    args = setup.cli_args(command)
    args[args.index("--dsn") + 1] = make_conninfo(setup.dsn, user=role)
    return args


def one_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == EX_CONFIG, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cdc-relay: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.asyncio
async def test_granted_role_can_validate_status_and_store_dead_letters(
    outbox: Setup, role: str
) -> None:
    role_dsn = make_conninfo(outbox.dsn, user=role)
    dl_table = outbox.settings.dead_letter_table
    # Without the grant: each command says what is missing, in one line.
    with psycopg.connect(role_dsn, autocommit=True) as conn, pytest.raises(ConfigError) as info:
        checks.validate(conn, outbox.settings)
    assert f"role {role} cannot write dead letters" in str(info.value)
    assert f"INSERT on {'.'.join(dl_table)}" in str(info.value)
    assert f"--grant-to {role}" in str(info.value)
    status = cli("status", "--json", "--no-require-active", *as_role(outbox, role))
    assert status.returncode == 1, status
    assert f"role {role} cannot write dead letters" in orjson.loads(status.stdout)["problems"][0]
    one_line(
        cli("dead-letters", "list", *as_role(outbox, role, "dead-letters list")),
        "permission denied",
        "--grant-to",
    )

    granted = cli("init", "--grant-to", role, *outbox.cli_args("init"))
    assert granted.returncode == 0, granted.stderr
    assert f"granted to {role}: USAGE on schema public" in granted.stdout
    assert f"granted to {role}: SELECT, INSERT, UPDATE on {'.'.join(dl_table)}" in granted.stdout
    assert f"granted to {role}: USAGE on sequence public." in granted.stdout
    assert "warning" not in granted.stdout  # the role already has LOGIN REPLICATION

    with psycopg.connect(role_dsn, autocommit=True) as conn:
        facts = checks.validate(conn, outbox.settings)
        assert facts.outbox_relid > 0
    writer = await DeadLetterWriter.connect(role_dsn, dl_table)
    try:
        await writer.write([DeadLetter("id-1", "unroutable", {"id": "id-1"}, 42)])
    finally:
        await writer.close()
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        assert [r.outbox_id for r in list_dead_letters(conn, dl_table)] == ["id-1"]
    listed = cli("dead-letters", "list", "--json", *as_role(outbox, role, "dead-letters list"))
    assert listed.returncode == 0, listed.stderr
    assert orjson.loads(listed.stdout)["reason"] == "unroutable"

    # status as the role: healthy only while a relay (here: a bare walsender) is attached
    idle = cli("status", "--json", *as_role(outbox, role))
    assert idle.returncode == 1
    assert "no relay is attached" in orjson.loads(idle.stdout)["problems"][0]
    stream = psycopg.connect(role_dsn, replication="database", autocommit=True)
    try:
        stream.pgconn.send_query(
            f"START_REPLICATION SLOT {outbox.names['slot']} LOGICAL 0/0"
            f" (proto_version '1', publication_names '{outbox.names['publication']}')".encode()
        )
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:
            for _ in range(50):
                info = catalog.slot_info(conn, outbox.names["slot"])
                if info is not None and info.active:
                    break
                time.sleep(0.1)
        healthy = cli("status", "--json", *as_role(outbox, role))
        assert healthy.returncode == 0, healthy.stdout
        assert orjson.loads(healthy.stdout)["problems"] == []
        with psycopg.connect(outbox.dsn, autocommit=True) as conn:  # make some lag
            conn.execute("SELECT pg_switch_wal()")
        lagging = cli("status", "--json", "--max-lag-bytes", "0", *as_role(outbox, role))
        assert lagging.returncode == 1, lagging.stdout
        assert "exceeds --max-lag-bytes 0" in orjson.loads(lagging.stdout)["problems"][0]
    finally:
        stream.close()


def test_grant_warns_about_a_role_without_replication(outbox: Setup, role: str) -> None:
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} NOREPLICATION")
        report = pg_setup.grant(conn, outbox.settings, role)
    assert f"warning: role {role} also needs LOGIN REPLICATION" in report[-1]
    with psycopg.connect(outbox.dsn, autocommit=True) as conn, pytest.raises(ConfigError):
        pg_setup.grant(conn, outbox.settings, "no_such_role_x")


def test_init_without_privileges_is_one_line(outbox: Setup, role: str) -> None:
    args = as_role(outbox, role, "init")
    args[args.index("--table") + 1] = outbox.table + "_mine"
    one_line(cli("init", *args), "init needs an admin role", "permission denied")

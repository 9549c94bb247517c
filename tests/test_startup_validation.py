"""Each startup misconfiguration: one clear line, exit code 78, no traceback."""

from __future__ import annotations

import subprocess

import psycopg

from cdc_relay.errors import EX_CONFIG
from devtools.servers import PostgresServer
from tests.fix_pg import ServerFactory
from tests.harness import Setup, run_cli, unique_names


def assert_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == EX_CONFIG, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdc-relay: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def with_names(setup: Setup, command: str = "run", **overrides: str) -> list[str]:
    args = setup.cli_args(command)
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        args[args.index(flag) + 1] = value
    return args


def test_wal_level_not_logical(pg_factory: ServerFactory[PostgresServer]) -> None:
    with pg_factory.running(settings={"wal_level": "replica"}) as pg:
        setup = Setup(pg.dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("wal"))
        assert_config_error(run_cli("run", *setup.cli_args()), "wal_level is 'replica'")
        assert_config_error(run_cli("init", *setup.cli_args("init")), "wal_level")


def test_missing_slot(outbox: Setup) -> None:
    result = run_cli("run", *with_names(outbox, slot="no_such_slot"))
    assert_config_error(result, "slot no_such_slot does not exist", "cdc-relay init")


def test_missing_publication(outbox: Setup) -> None:
    result = run_cli("run", *with_names(outbox, publication="no_such_pub"))
    assert_config_error(result, "publication no_such_pub does not exist")


def test_missing_table(outbox: Setup) -> None:
    result = run_cli("run", *with_names(outbox, table="public.no_such_table"))
    assert_config_error(result, "public.no_such_table does not exist")


def test_publication_publishes_more_than_inserts(outbox: Setup) -> None:
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(
            f"ALTER PUBLICATION {outbox.names['publication']} SET (publish = 'insert, delete')"
        )
    result = run_cli("run", *outbox.cli_args())
    assert_config_error(result, "inserts only", "publish = 'insert'")


def test_publication_covers_another_table(outbox: Setup) -> None:
    other = f"{outbox.table}_other"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {other} (id int primary key)")
        conn.execute(f"ALTER PUBLICATION {outbox.names['publication']} ADD TABLE {other}")
        try:
            result = run_cli("run", *outbox.cli_args())
        finally:
            conn.execute(f"DROP TABLE {other}")
    assert_config_error(result, "also covers", other)


def test_publication_misses_the_table(outbox: Setup) -> None:
    pub = outbox.names["publication"]
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(f"ALTER PUBLICATION {pub} DROP TABLE {outbox.table}")
    result = run_cli("run", *outbox.cli_args())
    assert_config_error(result, f"does not cover {outbox.table}", "ADD TABLE")


def test_slot_with_wrong_plugin(outbox: Setup) -> None:
    slot = outbox.names["slot"] + "_td"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
        try:
            result = run_cli("run", *with_names(outbox, slot=slot))
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert_config_error(result, "test_decoding", "pgoutput")


def test_unreachable_postgres_for_admin_commands(outbox: Setup) -> None:
    bad = with_names(outbox, "status", dsn="postgresql://postgres@127.0.0.1:1/postgres")
    assert_config_error(run_cli("status", *bad), "cannot connect to Postgres")


def test_invalid_table_name(outbox: Setup) -> None:
    assert_config_error(run_cli("run", *with_names(outbox, table="a.b.c")), "invalid --table")


def test_init_is_idempotent(outbox: Setup) -> None:
    first = run_cli("init", *outbox.cli_args("init"))
    assert first.returncode == 0, first.stderr
    assert "exchange" in first.stdout
    second = run_cli("init", *outbox.cli_args("init"))
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert "created" not in second.stdout


def test_status_json_reports_health(outbox: Setup) -> None:
    import orjson

    # No relay runs here: --require-active (the default since issue 9) would say unhealthy.
    result = run_cli("status", "--json", "--no-require-active", *outbox.cli_args("status"))
    assert result.returncode == 0, result.stderr
    info = orjson.loads(result.stdout)
    assert info["healthy"] is True
    assert info["slot_exists"] is True
    assert info["publication_tables"] == [outbox.table]
    assert isinstance(info["lag_bytes"], int)
    broken = run_cli(
        "status", "--json", "--no-require-active", *with_names(outbox, "status", slot="nope")
    )
    assert broken.returncode == 1
    assert "does not exist" in orjson.loads(broken.stdout)["problems"][0]

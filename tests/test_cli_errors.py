"""Bad input at the process level: one line, exit 2 or 78, and never a password."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cdc_relay.errors import EX_CONFIG, EX_USAGE
from tests.harness import Setup
from tests.harness import run_cli as cli

SECRET = "Sup3rSecretPw"
SECRET2 = "An0therS3cret"


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdc-relay: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_metrics_port_in_use(outbox: Setup, busy_port: int) -> None:
    result = cli("run", *outbox.cli_args(), "--metrics-port", str(busy_port))
    one_line(result, EX_CONFIG, "cannot serve metrics", str(busy_port))


def test_bad_metrics_host(outbox: Setup) -> None:
    result = cli("run", *outbox.cli_args(), "--metrics-port", "0", "--metrics-host", "no such host")
    one_line(result, EX_CONFIG, "cannot serve metrics", "--metrics-host")


@pytest.mark.parametrize("command", ["run", "status", "init", "drop", "prune"])
def test_dsn_syntax_error_hides_the_password(command: str) -> None:
    # libpq would quote the fragment after the password: that fragment must not be echoed.
    dsn = f"host=127.0.0.1 user=u {SECRET}"
    extra = ["--older-than", "1d"] if command == "prune" else []
    result = cli(command, "--dsn", dsn, *extra)
    line = one_line(result, EX_USAGE, "--dsn", "libpq cannot parse it")
    assert SECRET not in result.stderr + result.stdout, line


def test_dead_letters_replay_with_servers_down(outbox: Setup) -> None:
    pg_down = cli("dead-letters", "replay", "--dsn", f"postgresql://u:{SECRET}@127.0.0.1:1/db")
    one_line(pg_down, EX_CONFIG, "cannot connect to Postgres")
    args = outbox.cli_args("dead-letters replay")
    args[args.index("--amqp-url") + 1] = f"amqp://u:{SECRET2}@127.0.0.1:1/"
    rabbit_down = cli("dead-letters", "replay", *args)
    one_line(rabbit_down, EX_CONFIG, "cannot connect to RabbitMQ")
    assert SECRET not in pg_down.stderr and SECRET2 not in rabbit_down.stderr


def test_init_reports_an_exchange_of_another_type(outbox: Setup) -> None:
    import asyncio

    import aio_pika

    async def declare_fanout() -> None:
        connection = await aio_pika.connect(outbox.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_exchange(outbox.names["exchange"], "fanout", durable=True)

    asyncio.run(declare_fanout())
    one_line(cli("init", *outbox.cli_args("init")), EX_CONFIG, "exists with a different type")


def test_no_password_in_any_output_of_failing_runs(outbox: Setup, tmp_path: Path) -> None:
    """Every way to fail that echoes a DSN or URL: grep all output for the passwords."""
    pg_port = outbox.dsn.rsplit(":", 1)[1].split("/")[0]
    dsn_url = f"postgresql://postgres:{SECRET}@127.0.0.1:{pg_port}/postgres"
    dsn_kw = f"host=127.0.0.1 port=1 user=u password={SECRET} connect_timeout=1"
    amqp = f"amqp://guest:{SECRET2}@127.0.0.1:1/"
    runs = [
        cli("status", "--dsn", dsn_kw),
        cli("init", "--dsn", dsn_kw, "--amqp-url", amqp),
        cli("run", "--dsn", f"host=x password='{SECRET}"),  # unterminated quote
        cli("run", "--dsn", f"postgresql://u:{SECRET}@h:notaport/db"),
        cli("run", "--amqp-url", f"amqp://guest:pa#{SECRET2}@host/"),
        cli("run", "--amqp-url", f"amqp://guest:{SECRET2}/x@host:5672/"),
        cli("run", "--amqp-url", f"guest:{SECRET2}@host"),
        cli("run", "--dsn", dsn_url, "--routing-key", "{"),
        cli("dead-letters", "replay", "--dsn", dsn_kw, "--amqp-url", amqp),
        cli("dead-letters", "list", "--dsn", dsn_kw),
        cli("status", env={"CDC_RELAY_DSN": dsn_kw}),
    ]
    secret_file = tmp_path / "dsn"
    secret_file.write_text(dsn_kw + "\n")
    runs.append(cli("status", env={"CDC_RELAY_DSN_FILE": str(secret_file)}))
    # a relay that keeps retrying against servers that are down, for a few seconds
    for fmt in ("text", "json"):
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cdc_relay.cli",
                "--log-format",
                fmt,
                "--log-level",
                "DEBUG",
                "run",
                "--dsn",
                dsn_kw,
                "--amqp-url",
                amqp,
                "--reconnect-max",
                "0.5",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)
        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=30)
        assert err.strip(), "the relay logged nothing while failing"
        runs.append(subprocess.CompletedProcess(relay.args, relay.returncode, out, err))
    for result in runs:
        assert result.returncode != 0 or "run" in result.args[3:8], result
        output = result.stdout + result.stderr
        assert SECRET not in output and SECRET2 not in output, output
        assert "Traceback" not in output, output


def test_secret_files_take_precedence_over_plain_variables(tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("host=127.0.0.1 port=1 dbname=from_file connect_timeout=1\n")
    env = {
        "CDC_RELAY_DSN": "host=127.0.0.1 port=1 dbname=from_env connect_timeout=1",
        "CDC_RELAY_DSN_FILE": str(dsn_file),
    }
    from click.testing import CliRunner

    from cdc_relay import cli as cli_module

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        ctx = cli_module.status.make_context("status", [])
        assert "dbname=from_file" in ctx.params["dsn"]
        ctx = cli_module.status.make_context("status", ["--dsn", "dbname=from_flag"])
        assert ctx.params["dsn"] == "dbname=from_flag"  # the command line wins over both
        amqp_file = tmp_path / "amqp"
        amqp_file.write_text("amqp://a:b@h1/,amqp://a:b@h2/\n")
        mp.setenv("CDC_RELAY_AMQP_URL", "amqp://x@env/")
        mp.setenv("CDC_RELAY_AMQP_URL_FILE", str(amqp_file))
        replay = cli_module.dead_letters_replay
        ctx = replay.make_context("replay", [])
        assert ctx.params["amqp_urls"] == ["amqp://a:b@h1/", "amqp://a:b@h2/"]
    missing = CliRunner().invoke(
        cli_module.main, ["status"], env={"CDC_RELAY_DSN_FILE": str(tmp_path / "nope")}
    )
    assert missing.exit_code == EX_USAGE
    assert "cannot read CDC_RELAY_DSN_FILE" in missing.stderr


def test_json_logs_parse_line_by_line() -> None:
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cdc_relay.cli",
            "--log-format",
            "json",
            "run",
            "--dsn",
            "host=127.0.0.1 port=1 connect_timeout=1",
            "--reconnect-max",
            "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    relay.send_signal(signal.SIGTERM)
    _, err = relay.communicate(timeout=30)
    lines = err.splitlines()
    assert lines
    for line in lines:
        entry = orjson.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    assert any("session ended" in orjson.loads(line)["message"] for line in lines), err

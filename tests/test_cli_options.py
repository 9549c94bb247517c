"""The command line is generated from Settings: one default each, every bad value one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from cdc_relay import cli
from cdc_relay.config import Option, Settings, option_of
from cdc_relay.errors import EX_CONFIG, EX_USAGE
from cdc_relay.pg import setup as pg_setup
from cdc_relay.router import exchange_allowed

ROOT = Path(__file__).resolve().parent.parent


def parse(command: click.Command, args: list[str], env: dict[str, str] | None = None) -> Settings:
    """What a command would run with, without running it."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        ctx = command.make_context(command.name or "x", list(args))
    return cli.settings_from(**ctx.params)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env)


def assert_one_line(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdc-relay: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_defaults_come_from_settings() -> None:
    assert parse(cli.run, []) == Settings()
    common = parse(cli.status, [])
    assert (common.dsn, common.amqp_urls, common.slot) == (
        Settings().dsn,
        Settings().amqp_urls,
        Settings().slot,
    )


def test_every_setting_is_an_option_of_run_or_of_the_group() -> None:
    names = {p.name for p in cli.run.params} | {p.name for p in cli.main.params}
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields <= names, fields - names
    for f in dataclasses.fields(Settings):
        assert isinstance(f.metadata["cli"], Option), f.name
        assert f.metadata["cli"].help, f.name


def test_each_option_reads_its_env_var() -> None:
    env = {
        "CDC_RELAY_SLOT": "s1",
        "CDC_RELAY_FORMAT": "celery",
        "CDC_RELAY_HEARTBEAT": "0",
        "CDC_RELAY_MAX_IN_FLIGHT_BYTES": "1000",
        "CDC_RELAY_ALLOWED_EXCHANGES": "orders.*, billing, (default)",
        "CDC_RELAY_ALLOW_CC_HEADERS": "true",
        "CDC_RELAY_DECLARE": "false",
        "CDC_RELAY_AMQP_URL": "amqp://a@h1/,amqp://a@h2/",
        "CDC_RELAY_STATUS_INTERVAL": "0.5",
    }
    s = parse(cli.run, [], env)
    assert (s.slot, s.message_format, s.amqp_heartbeat, s.max_in_flight_bytes) == (
        "s1",
        "celery",
        0,
        1000,
    )
    assert s.allowed_exchanges == ["orders.*", "billing", "(default)"]
    assert s.allow_cc_headers is True
    assert s.declare_exchange is False
    assert s.amqp_urls == ["amqp://a@h1/", "amqp://a@h2/"]
    assert s.status_interval == 0.5
    assert exchange_allowed(s.allowed_exchanges, "orders.eu") and exchange_allowed(
        s.allowed_exchanges, "billing"
    )
    assert not exchange_allowed(s.allowed_exchanges, "billing2")
    assert exchange_allowed(Settings().allowed_exchanges, "anything")
    assert parse(cli.run, ["--no-declare"]).declare_exchange is False


@pytest.mark.parametrize("command", ["run", "resync", "replay"])
def test_every_publishing_command_reads_the_one_policy(command: str) -> None:
    """--allowed-exchanges was a `run` option only: replay published to amq.topic (issue 16)."""
    cmd = cli.dead_letters_replay if command == "replay" else getattr(cli, command)
    env = {
        "CDC_RELAY_ALLOWED_EXCHANGES": "outbox, (default)",
        "CDC_RELAY_ALLOW_CC_HEADERS": "true",
        "CDC_RELAY_MAX_MESSAGE_SIZE": "4096",
    }
    s = parse(cmd, [], env)
    assert s.allowed_exchanges == ["outbox", "(default)"]
    assert (s.allow_cc_headers, s.max_message_size) == (True, 4096)
    assert exchange_allowed(s.allowed_exchanges, "") and not exchange_allowed(
        s.allowed_exchanges, "amq.topic"
    )
    s = parse(cmd, ["--allowed-exchanges", "outbox", "--max-message-size", "10"])
    assert (s.allowed_exchanges, s.max_message_size) == (["outbox"], 10)
    assert not exchange_allowed(s.allowed_exchanges, "")


def test_a_default_exchange_the_policy_refuses_is_one_line() -> None:
    result = invoke("run", "--exchange", "events", "--allowed-exchanges", "orders.*")
    assert_one_line(result, EX_CONFIG, "--exchange 'events' is not allowed", "add events")
    result = invoke("dead-letters", "replay", "--format", "celery", "--allowed-exchanges", "outbox")
    assert_one_line(result, EX_CONFIG, "default exchange '' is not allowed", "(default)")


def test_sql_file_is_generated_from_the_package_data() -> None:
    """sql/outbox.sql is `cdc-relay init --print-sql` for the defaults, never edited by hand."""
    assert (ROOT / "sql" / "outbox.sql").read_text() == pg_setup.render_sql(Settings()), (
        "regenerate: python -m cdc_relay.cli init --print-sql > sql/outbox.sql"
    )


def _numeric_options() -> list[tuple[str, str]]:
    cases = []
    for f in dataclasses.fields(Settings):
        opt = option_of(f.name)
        kind = opt.value_type or type(f.default)
        if kind not in (int, float) or isinstance(f.default, bool):
            continue
        flag = opt.flag_for(f.name)
        bad = ["abc", "", "nan", "inf", "-inf", "1e999"]
        if opt.min is not None:
            bad.append(str(opt.min - 1))
        if opt.max is not None:
            bad.append(str(opt.max + 1) if kind is int else str(opt.max * 2))
        if kind is int:
            bad.append("1.5")
        cases += [(flag, value) for value in bad]
    return cases


@pytest.mark.parametrize(("flag", "value"), _numeric_options())
def test_bad_numbers_are_one_usage_line(flag: str, value: str) -> None:
    result = invoke("run", flag, value)
    assert_one_line(result, EX_USAGE, flag)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--format", "xml"], {}, "--format"),
        (["--on-unroutable", "drop"], {}, "--on-unroutable"),
        (["--log-format", "yaml"], {}, "--log-format"),
        (["--metrics-port", "70000"], {}, "--metrics-port"),
        (["--heartbeat", "65536"], {}, "--heartbeat"),
        (["--amqp-url", ""], {}, "--amqp-url"),
        ([], {"CDC_RELAY_AMQP_URL": ""}, "CDC_RELAY_AMQP_URL is set but empty"),
        ([], {"CDC_RELAY_DSN": ""}, "CDC_RELAY_DSN is set but empty"),
        (["--amqp-url", "guest:guest@localhost"], {}, "amqp:// or amqps://"),
        (["--amqp-url", "amqp://u:pa/ss@host/"], {}, "invalid port"),
        (["--amqp-url", "amqp://u:p#ss@host/"], {}, "invalid port"),
        (["--amqp-url", "amqp:///vhost"], {}, "no host"),
        (["--dsn", "host=x port"], {}, "libpq cannot parse it"),
        (["--no-such-option"], {}, "No such option"),
    ],
)
def test_bad_values_are_one_usage_line(args: list[str], env: dict[str, str], needle: str) -> None:
    assert_one_line(invoke("run", *args, env=env), EX_USAGE, needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--routing-key", "{"], "invalid --routing-key"),
        (["--routing-key", "{aggregate_type}.{nope}"], "unknown field {nope}"),
        (["--routing-key", "{event_type:d}"], "cannot be rendered"),
        (["--routing-key", "{id!r:>99999999999}"], "width or precision 99999999999"),
        (["--routing-key", "{payload[x]:.999999}"], "width or precision 999999"),
        (["--table", "a.b.c"], "invalid --table"),
        (["--reconnect-min", "10", "--reconnect-max", "1"], "--reconnect-min"),
        (["--slot", "Bad-Name"], "invalid --slot"),
        (["--retention", "0s"], "--retention must be at least"),
        (["--message-prefix", ""], "--message-prefix must not be empty"),
        (["--retention", "7d"], None),
        (["--max-in-flight", "4000"], None),
    ],
)
def test_bad_combinations_are_one_config_line(args: list[str], needle: str | None) -> None:
    if needle is None:  # the control: these settings parse and check cleanly
        parse(cli.run, args).check()
        return
    result = invoke("run", *args, "--dsn", "host=127.0.0.1 port=1 connect_timeout=1")
    assert_one_line(result, EX_CONFIG, needle)


def test_settings_check_applies_the_same_ranges() -> None:
    from cdc_relay.errors import ConfigError

    for name, value in [
        ("status_interval", math.nan),
        ("confirm_timeout", math.inf),
        ("max_in_flight", 0),
        ("amqp_heartbeat", 70000),
        ("message_format", "xml"),
    ]:
        with pytest.raises(ConfigError):
            dataclasses.replace(Settings(), **{name: value}).check()
    Settings().check()


def test_help_shows_defaults_and_env_vars() -> None:
    result = invoke("run", "--help")
    assert result.exit_code == 0
    text: Any = result.output
    assert "CDC_RELAY_MAX_IN_FLIGHT_BYTES" in text and "67108864" in text


def test_json_log_lines_carry_extra_fields_and_are_redacted() -> None:
    import logging

    import orjson

    from cdc_relay.logs import JsonFormatter
    from cdc_relay.redact import Redactor

    redact = Redactor(["postgresql://u:hunter22@h/db"])
    record = logging.LogRecord(
        "cdc_relay", logging.WARNING, __file__, 1, "cannot connect as %s", ("u:hunter22",), None
    )
    record.slot = "s1"
    record.lsn = "0/16B3748"
    entry = orjson.loads(JsonFormatter(redact).format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "cdc_relay"
    assert entry["message"] == "cannot connect as u:***"
    assert (entry["slot"], entry["lsn"]) == ("s1", "0/16B3748")
    assert entry["time"].endswith("+00:00")


def test_json_log_lines_redact_passwords_that_json_escapes() -> None:
    """JSON escapes '"' and '\\' in a password: it must be masked before it is encoded."""
    import logging

    import orjson

    from cdc_relay.logs import JsonFormatter
    from cdc_relay.redact import Redactor

    secret = 'pa"ss\\wd-1'
    redact = Redactor()
    redact.add_raw(secret)
    record = logging.LogRecord(
        "cdc_relay", logging.WARNING, __file__, 1, "auth failed: %s", (secret,), None
    )
    record.dsn = f"postgresql://u:{secret}@h/db"
    line = JsonFormatter(redact).format(record)
    entry = orjson.loads(line)
    assert entry["message"] == "auth failed: ***" and entry["dsn"] == "postgresql://u:***@h/db"
    assert "ss\\\\wd" not in line and 'pa\\"ss' not in line


@pytest.mark.parametrize(
    ("given", "secret"),
    [
        ("postgresql://u:s3cr%2Ft@h/db", "s3cr/t"),
        ("host=h password='se cret' user=u", "se cret"),
        ("host=h password=se\\'cret", "se'cret"),
        ("host=h password='unterminated", "unterminated"),
        ("amqp://guest:pa/ss#word@host:5672/", "pa/ss#word"),
        ("postgresql:///db?password=qu3ry", "qu3ry"),
        ("amqp://guest:p@ss@host/", "p@ss"),
    ],
)
def test_redactor_finds_passwords_in_unparseable_strings(given: str, secret: str) -> None:
    from cdc_relay.redact import Redactor

    redact = Redactor([given])
    assert secret not in redact(f"error near {secret} in {given!r}")

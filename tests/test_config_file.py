"""The relay file (--config relay.toml): its schema, one line per error, the CLI's precedence."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from cdc_relay import cli, config_file
from cdc_relay.cli_options import one_outbox, outboxes_of, settings_from
from cdc_relay.config import Settings
from cdc_relay.errors import EX_CONFIG, ConfigError

THREE = """
slot = "orders_slot"
publication = "orders_pub"
max_in_flight = 100
allowed_exchanges = ["orders", "billing", "audit*"]

[[outbox]]
table = "public.orders_outbox"
exchange = "orders"
routing_key = "order.{event_type}"

[[outbox]]
table = "billing.outbox"
exchange = "billing"
format = "event"

[[outbox]]
table = "audit_outbox"
exchange = "audit"
"""


def loads(text: str) -> config_file.RelayFile:
    return config_file.loads(text, "relay.toml")


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("relay.toml")
    return message


def test_a_file_of_three_outboxes() -> None:
    relay_file = loads(THREE)
    assert relay_file.defaults == {
        "slot": "orders_slot",
        "publication": "orders_pub",
        "max_in_flight": 100,
        "allowed_exchanges": ["orders", "billing", "audit*"],
    }
    assert relay_file.tables == ("public.orders_outbox", "billing.outbox", "audit_outbox")
    assert relay_file.outboxes[1] == {
        "table": "billing.outbox",
        "exchange": "billing",
        "message_format": "event",  # the file says format, as the flag --format
    }
    base = Settings(**relay_file.defaults)
    outboxes = config_file.outbox_settings(base, relay_file)
    assert [o.table_parts for o in outboxes] == [
        ("public", "orders_outbox"),
        ("billing", "outbox"),
        ("public", "audit_outbox"),
    ]
    assert [o.exchange for o in outboxes] == ["orders", "billing", "audit"]
    assert outboxes[0].routing_key == "order.{event_type}"
    assert outboxes[1].routing_key == Settings().routing_key
    assert {o.slot for o in outboxes} == {"orders_slot"}
    assert {o.max_in_flight for o in outboxes} == {100}
    assert [o.dead_letter_table for o in outboxes] == [
        ("public", "orders_outbox_dead_letter"),
        ("billing", "outbox_dead_letter"),
        ("public", "audit_outbox_dead_letter"),
    ]


def test_file_keys_are_the_long_option_names() -> None:
    assert config_file.file_key("message_format") == "format"
    assert config_file.file_key("amqp_urls") == "amqp_url"
    assert config_file.file_key("amqp_heartbeat") == "heartbeat"
    assert config_file.file_key("declare_exchange") == "declare"
    assert config_file.file_key("max_in_flight") == "max_in_flight"
    relay_file = loads(
        'amqp_url = "amqp://a/"\nheartbeat = 5\ndeclare = false\n'
        '[[outbox]]\ntable = "t"\nexchange = "e"\n'
    )
    assert relay_file.defaults == {
        "amqp_urls": ["amqp://a/"],
        "amqp_heartbeat": 5,
        "declare_exchange": False,
    }


def test_top_level_per_outbox_keys_are_defaults_for_every_outbox() -> None:
    relay_file = loads(
        'exchange = "shared"\nrouting_key = "x.{event_type}"\n'
        '[[outbox]]\ntable = "a"\n[[outbox]]\ntable = "b"\nexchange = "own"\n'
    )
    outboxes = config_file.outbox_settings(Settings(**relay_file.defaults), relay_file)
    assert [o.exchange for o in outboxes] == ["shared", "own"]
    assert {o.routing_key for o in outboxes} == {"x.{event_type}"}


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('slott = "x"\n[[outbox]]\ntable = "t"\nexchange = "e"', ["slott", "unknown key"]),
        ('slot = 3\n[[outbox]]\ntable = "t"\nexchange = "e"', ["slot", "must be a string"]),
        ('max_in_flight = "9"\n[[outbox]]\ntable = "t"\nexchange = "e"', ["max_in_flight"]),
        ("max_in_flight = 1.5\n[[outbox]]\ntable = 't'\nexchange = 'e'", ["whole number"]),
        ('max_in_flight = 0\n[[outbox]]\ntable = "t"\nexchange = "e"', ["at least 1"]),
        ('declare = "no"\n[[outbox]]\ntable = "t"\nexchange = "e"', ["true or false"]),
        ('allowed_exchanges = [1]\n[[outbox]]\ntable = "t"\nexchange = "e"', ["list of strings"]),
        ('on_unroutable = "drop"\n[[outbox]]\ntable = "t"\nexchange = "e"', ["one of"]),
        ('retention = 7\n[[outbox]]\ntable = "t"\nexchange = "e"', ["duration"]),
        ('slot = "s"', ["no [[outbox]]"]),
        ('outbox = "t"', ["[[outbox]]"]),
        ("outbox = []", ["no [[outbox]]"]),
        ('table = "t"\n[[outbox]]\ntable = "t"\nexchange = "e"', ["table", "its own [[outbox]]"]),
        ('log_level = "debug"\n[[outbox]]\ntable = "t"\nexchange = "e"', ["--log-level"]),
        ('[[outbox]]\nexchange = "e"', ["[[outbox]] 1", "missing key table"]),
        ('[[outbox]]\ntable = "t"', ["[[outbox]] 1 (t)", "missing key exchange"]),
        ('[[outbox]]\ntable = "t"\nexchange = "e"\nslot = "s"', ["slot", "top of the file"]),
        ('[[outbox]]\ntable = "t"\nexchange = "e"\ncolour = 1', ["colour", "unknown key"]),
        ('[[outbox]]\ntable = "t"\nexchange = 5', ["exchange", "must be a string"]),
        ('[[outbox]]\ntable = "t"\nexchange = "e"\nformat = "xml"', ["format", "one of"]),
        ('[[outbox]]\ntable = "a.b.c"\nexchange = "e"', ["invalid --table"]),
        (
            '[[outbox]]\ntable = "t"\nexchange = "e"\n[[outbox]]\ntable = "t"\nexchange = "f"',
            ["[[outbox]] 2", "same table as [[outbox]] 1"],
        ),
        (
            '[[outbox]]\ntable = "o"\nexchange = "e"\n'
            '[[outbox]]\ntable = "public.o"\nexchange = "f"',
            ["[[outbox]] 2", "'public.o' is the same table"],
        ),
        ("slot = ", ["not valid TOML"]),
    ],
)
def test_every_schema_error_is_one_line_naming_the_key(text: str, needles: list[str]) -> None:
    message = refused(text)
    for needle in needles:
        assert needle in message, message


def test_every_per_outbox_key_is_a_settings_field_with_a_flag() -> None:
    known = [n for n in config_file.PER_OUTBOX if n in Settings.__dataclass_fields__]
    assert known == list(config_file.PER_OUTBOX)
    for name in known:
        assert name in {p.name for p in cli.run.params}, name


def test_a_check_that_needs_the_whole_settings_names_the_outbox() -> None:
    relay_file = loads(
        'allowed_exchanges = ["orders"]\n[[outbox]]\ntable = "a"\nexchange = "orders"\n'
        '[[outbox]]\ntable = "b"\nexchange = "billing"\n'
    )
    with pytest.raises(ConfigError) as info:
        config_file.outbox_settings(Settings(**relay_file.defaults), relay_file)
    assert str(info.value).startswith("relay.toml: [[outbox]] 2 (b): --exchange 'billing'")


def test_select_picks_one_outbox_by_table() -> None:
    relay_file = loads(THREE)
    outboxes = config_file.outbox_settings(Settings(**relay_file.defaults), relay_file)
    assert config_file.select(outboxes, "public.audit_outbox").exchange == "audit"
    with pytest.raises(ConfigError, match="not an \\[\\[outbox\\]\\] of the file"):
        config_file.select(outboxes, "other")


def test_a_missing_or_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read --config .*nope\.toml"):
        config_file.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"slot = '\xff'")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config_file.load(bad)


# -- the command line ------------------------------------------------------------------


def _file(tmp_path: Path, text: str = THREE) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return str(path)


def parse_outboxes(
    command: click.Command, args: list[str], env: dict[str, str] | None = None
) -> list[Settings]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        ctx = command.make_context(command.name or "x", list(args))
        with ctx:
            return outboxes_of(settings_from(**ctx.params))


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    path = _file(tmp_path)
    from_file = parse_outboxes(cli.run, ["--config", path])
    assert len(from_file) == 3
    assert {o.max_in_flight for o in from_file} == {100}
    assert {o.slot for o in from_file} == {"orders_slot"}
    assert {o.status_interval for o in from_file} == {Settings().status_interval}  # default
    env = {"CDC_RELAY_MAX_IN_FLIGHT": "200", "CDC_RELAY_SLOT": "env_slot"}
    from_env = parse_outboxes(cli.run, ["--config", path], env)
    assert {(o.max_in_flight, o.slot) for o in from_env} == {(200, "env_slot")}
    from_flag = parse_outboxes(cli.run, ["--config", path, "--max-in-flight", "300"], env)
    assert {(o.max_in_flight, o.slot) for o in from_flag} == {(300, "env_slot")}
    by_env = parse_outboxes(cli.run, [], {"CDC_RELAY_CONFIG": path})
    assert [o.table for o in by_env] == [o.table for o in from_file]


def test_a_secret_file_variable_wins_over_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://from-secret-file/db")
    path = _file(tmp_path, 'dsn = "postgresql://from-toml/db"\n' + THREE)
    [first, *_] = parse_outboxes(cli.status, ["--config", path])
    assert first.dsn == "postgresql://from-toml/db"
    [first, *_] = parse_outboxes(
        cli.status, ["--config", path], {"CDC_RELAY_DSN_FILE": str(secret)}
    )
    assert first.dsn == "postgresql://from-secret-file/db"


def test_without_a_file_one_outbox_exactly_as_today() -> None:
    assert parse_outboxes(cli.run, []) == [Settings()]
    assert parse_outboxes(cli.run, ["--table", "x.y"]) == [Settings(table="x.y")]


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


def test_a_per_outbox_flag_beside_a_file_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path)
    result = invoke("run", "--config", path, "--exchange", "x")
    assert_one_line(result, EX_CONFIG, "--exchange", "set exchange in its [[outbox]]")
    result = invoke("status", "--config", path, env={"CDC_RELAY_TABLE": "x"})
    assert_one_line(result, EX_CONFIG, "CDC_RELAY_TABLE", "set table in its [[outbox]]")


def test_schema_errors_exit_78_in_one_line(tmp_path: Path) -> None:
    path = _file(tmp_path, THREE + "\n[[outbox]]\ntable = 'billing.outbox'\nexchange = 'x'\n")
    for command in (["run"], ["init"], ["status"], ["dead-letters", "list"]):
        result = invoke(*command, "--config", path)
        assert_one_line(result, EX_CONFIG, "relay.toml: [[outbox]] 4", "same table")
    result = invoke("run", "--config", str(tmp_path / "missing.toml"))
    assert_one_line(result, EX_CONFIG, "cannot read --config")


def test_commands_of_one_table_take_it_by_table(tmp_path: Path) -> None:
    path = _file(tmp_path)
    result = invoke("dead-letters", "list", "--config", path)
    assert_one_line(result, EX_CONFIG, "has 3 [[outbox]] tables", "--table", "billing.outbox")
    result = invoke("prune", "--config", path, "--table", "nope", "--older-than", "1d")
    assert_one_line(result, EX_CONFIG, "--table nope: not an [[outbox]]")
    result = invoke("resync", "--config", path, "--dry-run")
    assert_one_line(result, EX_CONFIG, "resync", "several outboxes")
    with pytest.MonkeyPatch.context():
        ctx = cli.dead_letters_list.make_context(
            "list", ["--config", path, "--table", "billing.outbox"]
        )
        with ctx:
            chosen = one_outbox(settings_from(**ctx.params), "dead-letters list")
    assert chosen.table == "billing.outbox"
    assert chosen.dead_letter_table == ("billing", "outbox_dead_letter")


def test_print_sql_of_a_file_covers_every_table(tmp_path: Path) -> None:
    result = invoke("init", "--config", _file(tmp_path), "--print-sql", "--no-inbox")
    assert result.exit_code == 0, result.stderr
    for table in ('"public"."orders_outbox"', '"billing"."outbox"', '"public"."audit_outbox"'):
        assert f"CREATE TABLE IF NOT EXISTS {table}" in result.output, table


# The issue's own example: a Debezium table in CloudEvents with a header column,
# spelled header_columns (the plural of --header-column).
MIXED = """
slot = "cdc_relay"
publication = "cdc_relay_outbox"

[[outbox]]
table = "public.orders_outbox"
exchange = "orders"
routing_key = "{aggregate_type}.{event_type}"
layout = "debezium"
format = "cloudevents"
header_columns = ["tenant_id:x-tenant"]

[[outbox]]
table = "billing.outbox"
exchange = "billing"
format = "cloudevents-structured"
ce_source = "urn:billing"
"""


def test_a_mixed_file_of_layouts_and_formats() -> None:
    relay_file = loads(MIXED)
    outboxes = config_file.outbox_settings(Settings(**relay_file.defaults), relay_file)
    orders, billing = outboxes
    assert (orders.layout, orders.message_format) == ("debezium", "cloudevents")
    assert orders.header_column == ["tenant_id:x-tenant"]
    assert (billing.layout, billing.message_format) == ("cdc-relay", "cloudevents-structured")
    assert (billing.header_column, billing.ce_source) == ([], "urn:billing")


@pytest.mark.parametrize(("plural", "key"), sorted(config_file.KEY_ALIASES.items()))
def test_a_plural_array_key_is_the_same_key(plural: str, key: str) -> None:
    spec = '"payload=body"' if key == "column" else '"tenant_id:x-tenant"'
    one = loads(f'[[outbox]]\ntable = "t"\nexchange = "e"\n{plural} = [{spec}]')
    other = loads(f'[[outbox]]\ntable = "t"\nexchange = "e"\n{key} = [{spec}]')
    assert one == other and one.outboxes[0][key] == [spec.strip('"')]
    top = loads(f'{plural} = [{spec}]\n[[outbox]]\ntable = "t"\nexchange = "e"')
    assert top.defaults == {key: [spec.strip('"')]}
    both = refused(f'[[outbox]]\ntable = "t"\nexchange = "e"\n{plural} = []\n{key} = []')
    assert f"[[outbox]] 1 (t): {plural}: the same key as {key}" in both


def toml_blocks(path: Path) -> list[str]:
    """The ```toml code blocks of a document."""
    return re.findall(r"^```toml\n(.*?)^```", path.read_text(), flags=re.M | re.S)


@pytest.mark.parametrize("document", ["README.md", "docs/config-file.md"])
def test_the_documented_relay_files_parse(document: str) -> None:
    path = Path(__file__).parent.parent / document
    blocks = [b for b in toml_blocks(path) if "[[outbox]]" in b]
    assert blocks, f"{document} shows no relay file"
    for block in blocks:
        relay_file = config_file.loads(block, document)
        config_file.outbox_settings(Settings(**relay_file.defaults), relay_file)

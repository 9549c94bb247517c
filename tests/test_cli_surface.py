"""What each command shows and accepts: only the options it uses, grouped, one-line errors."""

from __future__ import annotations

import re

import orjson
import pytest
from click.testing import CliRunner, Result

from cdc_relay import cli
from cdc_relay.config import SECTIONS
from cdc_relay.errors import EX_CONFIG, EX_USAGE
from tests.harness import Setup, run_cli

# Written out by hand, not derived from config.py: the test is what a reader of --help sees.
_RUN_AND_RESYNC = {
    "--dsn",
    "--amqp-url",
    "--slot",
    "--publication",
    "--table",
    "--exchange",
    "--routing-key",
    "--format",
    "--ce-source",
    "--declare",
    "--no-declare",
    "--max-in-flight",
    "--max-in-flight-bytes",
    "--confirm-timeout",
    "--heartbeat",
    "--amqp-connect-timeout",
    "--on-unroutable",
    "--max-message-size",
    "--allowed-exchanges",
    "--allow-cc-headers",
}
# The column mapping: every command that reads outbox rows or checks their table.
_MAPPING = {"--layout", "--column", "--header-column"}
_RUN_AND_RESYNC |= _MAPPING
EXPECTED: dict[str, set[str]] = {
    "init": {
        "--dsn",
        "--amqp-url",
        "--slot",
        "--publication",
        "--table",
        "--exchange",
        "--format",
        "--message-prefix",
        "--amqp-connect-timeout",
        "--no-table",
        "--no-exchange",
        "--no-inbox",
        "--grant-to",
        "--emit",
        "--grant-emit-to",
        "--failover",
        "--print-sql",
    }
    | _MAPPING,
    "run": _RUN_AND_RESYNC
    | {
        "--message-prefix",
        "--retention",
        "--status-interval",
        "--shutdown-timeout",
        "--reconnect-min",
        "--reconnect-max",
        "--tcp-keepalive-idle",
        "--tcp-keepalive-interval",
        "--tcp-keepalive-count",
        "--pg-timeout",
        "--stats-interval",
        "--slot-poll-interval",
        "--metrics-port",
        "--metrics-host",
        "--event-loop",
    },
    "resync": _RUN_AND_RESYNC | {"--since", "--margin", "--dry-run", "--failover"},
    "status": {
        "--dsn",
        "--slot",
        "--publication",
        "--table",
        "--message-prefix",
        "--json",
        "--require-active",
        "--no-require-active",
        "--max-lag-bytes",
        "--max-stall",
    }
    | _MAPPING,
    "drop": {
        "--dsn",
        "--slot",
        "--publication",
        "--table",
        "--drop-publication",
        "--force",
        "--yes",
    },
    "prune": {"--dsn", "--table", "--older-than", "--batch"} | _MAPPING,
    "dead-letters list": {"--dsn", "--table", "--all", "--json"},
    "dead-letters prune": {"--dsn", "--table", "--older-than", "--include-pending", "--batch"},
    "dead-letters replay": {
        "--dsn",
        "--amqp-url",
        "--table",
        "--exchange",
        "--routing-key",
        "--format",
        "--ce-source",
        "--max-in-flight-bytes",
        "--confirm-timeout",
        "--heartbeat",
        "--amqp-connect-timeout",
        "--max-message-size",
        "--allowed-exchanges",
        "--allow-cc-headers",
        "--id",
        "--since",
        "--until",
        "--reason",
        "--limit",
        "--to-exchange",
        "--to-routing-key",
        "--dry-run",
        "--json",
    }
    | _MAPPING,
}
for _shown in EXPECTED.values():
    _shown.add("--config")  # every command reads the relay file (docs/config-file.md)
# The option column of a help line: "  --a / --no-a TYPE   help..." up to the help text.
_OPTION_LINE = re.compile(r"^  (?:-\w, )?(--\S.*?)(?:\s{2,}|$)")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def help_options(command: str) -> tuple[set[str], str]:
    result = invoke(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    names: set[str] = set()
    for line in result.output.splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            names |= set(re.findall(r"--[a-z][a-z-]*", match[1]))
    return names - {"--help"}, result.output


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_each_command_shows_exactly_the_options_it_uses(command: str) -> None:
    shown, _ = help_options(command)
    assert shown == EXPECTED[command], (shown - EXPECTED[command], EXPECTED[command] - shown)


@pytest.mark.parametrize(
    ("command", "foreign"),
    [
        ("status", ["--amqp-url", "amqp://h/"]),
        ("drop", ["--exchange", "x"]),
        ("prune", ["--amqp-connect-timeout", "1", "--older-than", "1d"]),
        ("dead-letters list", ["--routing-key", "x"]),
        ("resync", ["--metrics-port", "1"]),
    ],
)
def test_an_option_a_command_does_not_use_is_refused(command: str, foreign: list[str]) -> None:
    result = invoke(*command.split(), *foreign)
    assert result.exit_code == EX_USAGE, result.output
    assert f"No such option '{foreign[0]}'" in result.stderr, result.stderr


def test_run_help_groups_its_options_and_ends_with_the_exit_codes() -> None:
    _, text = help_options("run")
    headings = [line[:-1] for line in text.splitlines() if re.fullmatch(r"[A-Z][a-z ]+:", line)]
    assert headings == ["Options", *SECTIONS, "Exit codes"], headings
    assert SECTIONS == ("Connections", "Mapping", "Flow control", "Timeouts", "Observability")
    tail = text[text.index("Exit codes:") :]
    for code in ("0", "2", "70", "78"):
        assert re.search(rf"^  {code}\s+\S", tail, re.MULTILINE), tail
    mapping = text[text.index("Mapping:") : text.index("Flow control:")]
    assert "--routing-key" in mapping and "--dsn" not in mapping


@pytest.mark.parametrize("command", ["status", "dead-letters replay", "prune"])
def test_a_usage_error_names_the_subcommands_help(command: str) -> None:
    result = invoke(*command.split(), "--no-such-option")
    assert result.exit_code == EX_USAGE
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdc-relay: error: No such option"), lines[0]
    assert lines[0].endswith(f"(see cdc-relay {command} --help)"), lines[0]


def test_the_log_options_belong_to_the_group() -> None:
    shown, text = help_options("")
    assert {"--log-level", "--log-format", "--version"} <= shown, shown
    assert "[debug|info|warning|error]" in text
    assert "default: info]" in text, text  # not INFO while the choices are lower case


def _json_lines(stderr: str) -> list[dict[str, object]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    entries = [orjson.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    return entries


def test_every_command_logs_json_with_the_group_option_even_its_error() -> None:
    for command in (["status"], ["prune", "--older-than", "1d"], ["dead-letters", "list"]):
        result = run_cli(
            "--log-format", "json", *command, "--dsn", "host=127.0.0.1 port=1 connect_timeout=1"
        )
        assert result.returncode == EX_CONFIG, result.stderr
        (entry,) = _json_lines(result.stderr)
        assert entry["level"] == "ERROR" and "cannot connect to Postgres" in str(entry["message"])
    env = {"CDC_RELAY_LOG_FORMAT": "json"}
    by_env = run_cli("status", "--dsn", "host=127.0.0.1 port=1 connect_timeout=1", env=env)
    assert _json_lines(by_env.stderr)[0]["level"] == "ERROR"


def test_status_writes_json_log_lines(outbox: Setup) -> None:
    result = run_cli(
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "status",
        "--no-require-active",
        *outbox.cli_args("status"),
    )
    assert result.returncode == 0, result.stderr
    entries = _json_lines(result.stderr)
    assert entries[0]["message"] == "cdc-relay status", entries
    assert "slot" in result.stdout  # the report itself stays on stdout

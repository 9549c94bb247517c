"""Row values in text output: a control character in one never forges a line.

A row's id, exchange, routing key and header names reach the relay's text log
and `dead-letters list` through dead-letter reasons. A newline there used to
write a whole forged ``ERROR`` line into the log.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import psycopg
import pytest

from cdc_relay.logs import TextFormatter, escape_controls
from tests.harness import Setup, run_cli

FORGED = "2026-01-01 00:00:00,000 ERROR cdc_relay.relay: forged"
# A line that starts like a record but is not one of ours.
FORGED_LINE = re.compile(r"^\s*2026-01-01 00:00:00,000 ERROR", re.MULTILINE)


def render(msg: str, *args: object, exc: bool = False) -> str:
    record = logging.LogRecord("cdc_relay.relay", logging.WARNING, "x", 1, msg, args, None)
    if exc:
        try:
            raise ValueError(f"bad id x\n{FORGED}")
        except ValueError:
            record.exc_info = sys.exc_info()
    return TextFormatter(lambda text: text).format(record)


def test_text_log_escapes_control_characters_in_values_and_tracebacks() -> None:
    line = render("dead-lettered outbox row %s: %s", f"id\n{FORGED}", "reason\r\x1b[2K\x00")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
    assert line.endswith(f"dead-lettered outbox row id\\n{FORGED}: reason\\r\\x1b[2K\\x00")
    with_traceback = render("failed", exc=True)
    assert "\n" not in with_traceback
    assert "\\nTraceback (most recent call last):\\n" in with_traceback
    assert f"bad id x\\n{FORGED}" in with_traceback


def test_escaping_is_idempotent_and_keeps_backslashes_and_unicode() -> None:
    text = "C:\\temp\\new é ü 😀 \u2028"
    assert escape_controls(text) == "C:\\temp\\new é ü 😀 \\u2028"
    assert escape_controls(escape_controls(f"a\n{text}")) == escape_controls(f"a\n{text}")


@pytest.mark.asyncio
@pytest.mark.integration
async def test_a_dead_lettered_row_forges_no_line_in_the_log_or_the_list(
    outbox: Setup, relays: Any
) -> None:
    bad = f"id-1\n{FORGED} id\x1b[2K"
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        # A user-managed outbox may use text ids (the dead-letter table stores any).
        conn.execute(f"ALTER TABLE {outbox.table} ALTER COLUMN id DROP DEFAULT")
        conn.execute(f"ALTER TABLE {outbox.table} ALTER COLUMN id TYPE text")
    relay = relays(outbox)
    await relay.wait_for_log_async("streaming from slot")
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {outbox.table} (id, aggregate_type, aggregate_id, event_type,"
            " payload, exchange) VALUES (%s, 'order', '1', 'Created', '{}', %s)",
            (bad, f"{outbox.names['exchange']}\n{FORGED} exchange"),
        )
    # After the id: stderr is line-buffered, so waiting for the start could read half a record.
    await relay.wait_for_log_async("invalid exchange name", timeout=30)
    log = relay.log()
    assert not FORGED_LINE.search(log), log[-3000:]
    assert "forged id\\x1b[2K" in log, log[-3000:]  # the value is there, escaped
    listed = run_cli("dead-letters", "list", *outbox.cli_args("dead-letters list"))
    assert listed.returncode == 0, listed.stderr
    assert escape_controls(bad) in listed.stdout and "forged exchange" in listed.stdout
    assert not FORGED_LINE.search(listed.stdout), listed.stdout
    header, *rows = listed.stdout.splitlines()
    assert header == "id\toutbox_id\tcreated_at\tstate\treason" and len(rows) == 1, listed.stdout

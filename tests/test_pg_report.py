"""``status``: one fixed JSON schema and a text a person reads, from one ``SlotStatus``.

Operators' scripts read ``status --json`` by key, so its keys never depend on the
state (a missing slot, a standby, an unreadable table): schema 1, every key always
present, null where unknown. The text is rendered from the same dict
(``cdc_relay.status_view``) and shows words, never Python values.
"""

from __future__ import annotations

import re

import orjson
import pytest

from cdc_relay.pg.report import PrimarySlot, SlotStatus, StandbySlot
from cdc_relay.status_view import duration, render_text, size

KEYS = [
    "schema",
    "role",
    "slot",
    "slot_exists",
    "plugin",
    "database",
    "active",
    "active_pid",
    "active_client",
    "failover",
    "synced",
    "temporary",
    "failover_ready",
    "confirmed_flush_lsn",
    "restart_lsn",
    "replay_lsn",
    "wal_status",
    "current_wal_lsn",
    "lag_bytes",
    "lag_seconds",
    "retained_wal_bytes",
    "safe_wal_size",
    "publication",
    "publication_exists",
    "publication_tables",
    "dead_letter_table_exists",
    "dead_letters_pending",
    "tables",
    "healthy",
    "problems",
    "warnings",
    "implementation",
]
PYTHON_REPR = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\[|\]|'")


def primary_slot(**changes: object) -> PrimarySlot:
    slot = PrimarySlot(
        plugin="pgoutput",
        database="app",
        active=True,
        active_pid=42,
        active_client="cdc-relay host at 10.0.0.1:5000",
        failover=None,
        confirmed_flush_lsn="0/10",
        restart_lsn="0/8",
        wal_status="reserved",
        current_wal_lsn="0/20",
        lag_bytes=7872,
        retained_wal_bytes=3 * 1024 * 1024,
        safe_wal_size=None,
        lag_seconds=125.0,
    )
    for key, value in changes.items():
        setattr(slot, key, value)
    return slot


def with_slot() -> SlotStatus:
    return SlotStatus(
        role="primary",
        slot="s",
        slot_exists=True,
        primary=primary_slot(),
        publication="p",
        publication_exists=True,
        publication_tables=["public.outbox", "public.other"],
        dead_letter_table_exists=True,
        dead_letters_pending=3,
    )


def without_slot() -> SlotStatus:
    status = SlotStatus(role="primary", slot="s", slot_exists=False, publication="p")
    status.problems += ["slot s does not exist", "no relay is attached to slot s"]
    return status


def standby() -> SlotStatus:
    copy = StandbySlot(
        failover=True,
        synced=True,
        temporary=False,
        failover_ready=True,
        confirmed_flush_lsn="0/10",
        replay_lsn="0/20",
    )
    return SlotStatus(role="standby", slot="s", slot_exists=True, standby=copy)


@pytest.mark.parametrize("make", [with_slot, without_slot, standby])
def test_json_keys_are_the_same_whatever_the_state(make: object) -> None:
    assert callable(make)
    shown = make().as_dict()
    assert list(shown) == KEYS
    assert shown["schema"] == 1
    assert "problem" not in shown  # one problem list, not problems[0] again
    assert orjson.loads(orjson.dumps(shown)) == shown


def test_unknown_values_are_null() -> None:
    shown = without_slot().as_dict()
    assert shown["lag_bytes"] is None and shown["active"] is None
    assert shown["dead_letters_pending"] is None
    assert (shown["healthy"], len(shown["problems"])) == (False, 2)
    assert standby().as_dict()["publication"] is None
    assert with_slot().as_dict()["lag_bytes"] == 7872


@pytest.mark.parametrize("make", [with_slot, without_slot, standby])
def test_text_has_no_python_values(make: object) -> None:
    assert callable(make)
    lines = render_text(make().as_dict())
    for line in lines:
        assert not PYTHON_REPR.search(line), line


def test_text_reads_like_words() -> None:
    text = "\n".join(render_text(with_slot().as_dict()))
    assert re.search(r"^relay attached: +yes$", text, re.MULTILINE), text
    assert re.search(r"^failover slot: +-$", text, re.MULTILINE), text
    assert "published tables:     public.outbox, public.other" in text
    assert "lag:                  7,872 bytes (7.7 KiB), newest confirmed commit 2m 5s ago" in text
    assert "WAL retained:         3.0 MiB" in text
    assert "dead letters:         3 pending" in text
    assert text.endswith("problems:             none")


def test_text_lists_each_problem_once() -> None:
    lines = render_text(without_slot().as_dict())
    assert lines[-3:] == [
        "problems (2):",
        "  - slot s does not exist",
        "  - no relay is attached to slot s",
    ]
    assert sum("slot s does not exist" in line for line in lines) == 1
    assert "no dead-letter table" in "\n".join(lines)


def test_sizes_and_durations() -> None:
    assert [size(n) for n in (None, 0, 1023, 1024, 5 * 2**20, 3 * 2**30, 5000 * 2**30)] == [
        "-",
        "0 bytes",
        "1023 bytes",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 GiB",
        "5000.0 GiB",
    ]
    assert [duration(s) for s in (None, 0, 59.6, 61, 3723, 2 * 86400 + 4 * 3600)] == [
        "-",
        "0s",
        "1m 0s",
        "1m 1s",
        "1h 2m",
        "2d 4h",
    ]

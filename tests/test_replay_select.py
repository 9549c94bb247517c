"""What ``dead-letters`` commands select and print, without servers.

The selection is one SQL condition shared by the dry run and the replay; the
outputs are a header row plus tab-separated lines, or JSON Lines with the row's
payload and headers nested and RFC 3339 times.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from cdc_relay.cli_deadletters import (
    REPLAY_HEADER,
    outcome_as_json,
    outcome_as_text,
    selection_of,
    summary,
)
from cdc_relay.deadletters import LIST_HEADER, DeadLetterRecord, record_as_json, record_as_text
from cdc_relay.replay import ReplayOutcome
from cdc_relay.replay_select import Redirect, Selection
from cdc_relay.rows import OutboxRow

SINCE = datetime(2026, 12, 1, tzinfo=UTC)
UNTIL = datetime(2026, 12, 2, tzinfo=UTC)


def record(**changes: object) -> DeadLetterRecord:
    row = {
        "id": "o-1",
        "aggregate_type": "order",
        "aggregate_id": "1",
        "event_type": "Created",
        "payload": '{"n": 1, "tags": ["a"]}',
        "headers": '{"h": "v"}',
        "exchange": None,
        "routing_key": None,
        "created_at": "2026-12-01 10:00:00.5+00",
    }
    fields: dict[str, object] = {
        "id": 7,
        "outbox_id": "o-1",
        "reason": "NO_ROUTE\tthen\nmore",
        "row_data": row,
        "lsn": "0/1",
        "created_at": "2026-12-01T10:00:01.000000Z",
        "replayed_at": None,
    }
    fields.update(changes)
    return DeadLetterRecord(**fields)  # type: ignore[arg-type]


def test_the_selection_is_one_condition_with_its_parameters() -> None:
    where, params = Selection().where()
    assert where.as_string(None) == "replayed_at IS NULL" and params == []
    where, params = Selection(ids=(1, 2), since=SINCE, until=UNTIL, reason="No_Route").where()
    assert where.as_string(None) == (
        "replayed_at IS NULL AND id = ANY(%s) AND created_at >= %s AND created_at < %s"
        " AND strpos(lower(reason), lower(%s)) > 0"
    )
    assert params == [[1, 2], SINCE, UNTIL, "No_Route"]


def test_the_limit_caps_each_round() -> None:
    assert [Selection().take(n, 500) for n in (0, 10_000)] == [500, 500]
    limited = Selection(limit=3)
    assert [limited.take(n, 2) for n in (0, 1, 2, 3, 4)] == [2, 2, 1, 0, 0]


def test_an_empty_window_is_a_usage_error() -> None:
    import click

    with pytest.raises(click.UsageError, match="--since"):
        selection_of((), UNTIL, SINCE, None, None)
    assert selection_of((3,), SINCE, UNTIL, "x", 5) == Selection((3,), SINCE, UNTIL, "x", 5)
    assert selection_of((), None, None, None, None) == Selection()


def test_a_redirect_replaces_only_what_it_names() -> None:
    row = OutboxRow("o", "order", "1", "Created", b"{}", None, "mine", "my.key")
    assert Redirect().apply(row) is row
    moved = Redirect(exchange="elsewhere").apply(row)
    assert (moved.exchange, moved.routing_key) == ("elsewhere", "my.key")
    both = Redirect(exchange="", routing_key="q").apply(row)
    assert (both.exchange, both.routing_key) == ("", "q")


def test_list_json_nests_payload_and_headers_with_rfc3339_times() -> None:
    shown = orjson.loads(record_as_json(record()))
    assert shown["row"]["payload"] == {"n": 1, "tags": ["a"]}
    assert shown["row"]["headers"] == {"h": "v"}
    assert shown["created_at"] == "2026-12-01T10:00:01.000000Z"
    assert shown["row"]["created_at"] == "2026-12-01T10:00:00.500000Z"
    assert (shown["state"], shown["replayed_at"]) == ("pending", None)
    for stamp in (shown["created_at"], shown["row"]["created_at"]):
        assert datetime.fromisoformat(stamp).tzinfo is not None


def test_list_json_keeps_a_truncated_payload_as_text() -> None:
    cut = record()
    cut.row_data.update(payload='{"n": "xx', truncated=["payload"])
    shown = orjson.loads(record_as_json(cut))
    assert shown["row"]["payload"] == '{"n": "xx' and shown["row"]["truncated"] == ["payload"]


def test_list_text_lines_match_the_header() -> None:
    line = record_as_text(record(replayed_at="2026-12-02T00:00:00.000000Z"))
    assert len(line.split("\t")) == len(LIST_HEADER) == 5
    assert "\n" not in line and "NO_ROUTE\\tthen\\nmore" in line
    assert "replayed 2026-12-02T00:00:00.000000Z" in line


def test_replay_outcomes_row_by_row() -> None:
    ok = ReplayOutcome(record(), None, "", "q")
    bad = ReplayOutcome(record(id=8), "404 NOT_FOUND", None, None)
    assert orjson.loads(outcome_as_json(ok, True)) == {
        "id": 7,
        "outbox_id": "o-1",
        "created_at": "2026-12-01T10:00:01.000000Z",
        "reason": "NO_ROUTE\tthen\nmore",
        "outcome": "would_replay",
        "dry_run": True,
        "exchange": "",
        "routing_key": "q",
        "error": None,
    }
    assert orjson.loads(outcome_as_json(bad, False))["outcome"] == "failed"
    assert outcome_as_text(ok, False).split("\t") == ["7", "o-1", "replayed", "(default)", "q", "-"]
    assert len(outcome_as_text(bad, True).split("\t")) == len(REPLAY_HEADER)
    assert summary([ok, bad], True) == "dry run: 1 would be replayed, 1 would fail"
    assert summary([ok, bad], False) == "1 replayed, 1 failed"

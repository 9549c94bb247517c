"""The pure parts of resync and the relay state: time parsing, slot health, write throttling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.pg.slotwait import Blocker, describe
from cdc_relay.resync import Plan, invalidation, parse_since
from cdc_relay.resync_guard import ResyncUnderWay, resync_lock_key, resync_problem
from cdc_relay.state import (
    Position,
    RelayState,
    format_since,
    recorded_position,
    start_position,
)


def test_parse_since_bare_time_is_utc() -> None:
    assert parse_since("2026-11-28T09:00:00") == datetime(2026, 11, 28, 9, tzinfo=UTC)
    assert parse_since("2026-11-28 09:00") == datetime(2026, 11, 28, 9, tzinfo=UTC)


def test_parse_since_keeps_an_offset_and_z() -> None:
    cet = parse_since("2026-11-28T10:00:00+01:00")
    assert cet == datetime(2026, 11, 28, 9, tzinfo=UTC)
    assert cet.utcoffset() == timedelta(hours=1)
    assert parse_since("2026-11-28T09:00:00Z") == datetime(2026, 11, 28, 9, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "", "09:00 tomorrow"])
def test_parse_since_refuses_what_is_not_iso(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_since(text)


def test_format_since_round_trips_to_no_later_time() -> None:
    value = datetime(2026, 11, 28, 10, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=1)))
    text = format_since(value)
    assert text == "2026-11-28T09:00:00+00:00"
    assert parse_since(text) <= value


@pytest.mark.parametrize(
    ("slot", "why"),
    [
        ({"wal_status": "reserved", "invalidation_reason": None}, None),
        ({"wal_status": "extended"}, None),
        ({"wal_status": "lost"}, "lost (wal_status=lost)"),
        ({"wal_status": "reserved", "invalidation_reason": "idle_timeout"}, "invalidated"),
        ({"wal_status": "reserved", "conflicting": True}, "invalidated (conflicting)"),
        ({"wal_status": "reserved", "conflicting": False}, None),
    ],
)
def test_invalidation_on_pg16_to_18_columns(slot: dict[str, object], why: str | None) -> None:
    got = invalidation(slot)
    if why is None:
        assert got is None
    else:
        assert got is not None and got.startswith(why)


def test_plan_describes_drop_only_when_a_slot_exists() -> None:
    since = datetime(2026, 11, 28, 9, tzinfo=UTC)
    missing = Plan("s", since, "--since", "missing", False, 3).describe()
    assert missing[0] == "replication slot s: missing: create it again"
    assert missing[1].endswith(": 3")
    lost = Plan("s", since, "--since", "lost (wal_status=lost)", True, 0).describe()
    assert (
        lost[0] == "replication slot s: lost (wal_status=lost): drop it, create it again (failover)"
    )


def _recorded(since: datetime | None) -> RelayState:
    now = datetime(2026, 11, 28, 9, tzinfo=UTC)
    return RelayState("s1", now, "0/10", now, since)


def test_resync_problem_under_way_waits_interrupted_names_the_command() -> None:
    settings = Settings(slot="s1")
    since = datetime(2026, 11, 28, 8, 30, 0, 500, tzinfo=UTC)
    assert resync_problem(settings, None, None) is None
    assert resync_problem(settings, _recorded(None), None) is None
    running = resync_problem(settings, _recorded(since), 4242)
    assert isinstance(running, ResyncUnderWay) and "pid 4242" in str(running)
    stopped = resync_problem(settings, _recorded(since), None)
    assert type(stopped) is ConfigError
    assert "`cdc-relay resync --slot s1 --since 2026-11-28T08:30:00+00:00`" in str(stopped)
    assert "let it stream" not in str(stopped)


def test_resync_lock_key_is_two_non_negative_int4() -> None:
    for slot in ("cdc_relay", "s1", "a" * 63):
        key1, key2 = resync_lock_key(slot)
        assert 0 <= key1 < 2**31 and 0 <= key2 < 2**31
    assert resync_lock_key("a") != resync_lock_key("b")


def test_start_position_uses_only_positions_of_this_wal() -> None:
    own = Position(0x5000, "sys1", 1)  # a session of this process, on timeline 1
    row = Position(0x4000, "sys1", None)  # the state row: any timeline of sys1
    assert start_position([own, row], "sys1", 1, 0x9000) == 0x5000
    # Promoted standby (timeline 2): the session's position may be past its WAL's fork.
    assert start_position([own, row], "sys1", 2, 0x9000) == 0x4000
    # Another system (a restored dump): its positions mean nothing here.
    assert start_position([own, row], "sys2", 1, 0x9000) == 0
    # Never past the server's end of WAL.
    assert start_position([own, row], "sys1", 1, 0x4800) == 0x4000
    assert start_position([], "sys1", 1, 0x9000) == 0


def test_recorded_position_needs_the_system_identifier() -> None:
    now = datetime(2026, 11, 28, 9, tzinfo=UTC)
    assert recorded_position(RelayState("s1", now, "0/10", now, None)) is None
    assert recorded_position(RelayState("s1", now, "0/10", now, None, "7")) == Position(
        0x10, "7", None
    )
    assert recorded_position(None) is None


def test_describe_names_pids_and_gids() -> None:
    line = describe(
        "init: creating replication slot s",
        [Blocker(42, None, "idle in transaction", 12), Blocker(None, "g1", None, 30)],
        10.0,
    )
    assert line == (
        "init: creating replication slot s: waiting 10s for 2 transaction(s) that started "
        "before it to end: pid 42 (idle in transaction, transaction 12s old), prepared "
        "transaction 'g1' (prepared 30s ago: COMMIT PREPARED or ROLLBACK PREPARED it)"
    )
    assert "none visible" in describe("init", [], 5.0)

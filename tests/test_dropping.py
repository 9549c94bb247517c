"""``drop``'s decision, without servers: what a slot still holds refuses the drop."""

from __future__ import annotations

from datetime import UTC, datetime

from cdc_relay.config import Settings
from cdc_relay.pg.dropping import SlotHold, refusal, resync_command

AT = datetime(2026, 12, 1, 10, 30, tzinfo=UTC)


def hold(**changes: object) -> SlotHold:
    base: dict[str, object] = {
        "slot": "s",
        "exists": True,
        "active_pid": None,
        "unconfirmed_bytes": 7872,
        "unconfirmed_changes": 2,
        "confirmed_commit_at": AT,
    }
    base.update(changes)
    return SlotHold(**base)  # type: ignore[arg-type]


def test_unpublished_rows_refuse_unless_forced() -> None:
    said = refusal(hold(), force=False)
    assert said is not None and "\\n" not in said
    assert "it holds 2 outbox row(s) or emitted message(s)" in said
    assert "7,872 bytes of WAL" in said and "committed after 2026-12-01T10:30:00+00:00" in said
    assert "--force" in said
    assert refusal(hold(), force=True) is None


def test_uncountable_wal_refuses_like_rows() -> None:
    said = refusal(hold(unconfirmed_changes=None), force=False)
    assert said is not None and "7,872 bytes of WAL" in said and "could not count" in said


def test_nothing_to_lose_is_no_refusal() -> None:
    assert refusal(hold(unconfirmed_changes=0), force=False) is None
    assert refusal(hold(unconfirmed_bytes=0, unconfirmed_changes=None), force=False) is None
    assert refusal(hold(exists=False, unconfirmed_bytes=None), force=False) is None


def test_an_attached_relay_refuses_unless_forced() -> None:
    for changes in (0, 2, None):
        said = refusal(hold(active_pid=4242, unconfirmed_changes=changes), force=False)
        assert said is not None and "pid 4242" in said and "stop the relay first" in said
        assert refusal(hold(active_pid=4242, unconfirmed_changes=changes), force=True) is None


def test_resync_command_starts_a_margin_before_the_recorded_commit() -> None:
    settings = Settings(slot="orders")
    assert resync_command(hold(), settings) == (
        "cdc-relay resync --slot orders --since 2026-12-01T10:15:00+00:00"
    )
    assert "--since TIMESTAMP" in resync_command(hold(confirmed_commit_at=None), settings)

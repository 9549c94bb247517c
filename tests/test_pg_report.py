"""``SlotStatus.as_dict``: the keys and order ``cdc-relay status`` printed before it was typed.

Operators' scripts read ``status --json`` and the text form line by line, so
the restructuring into a dataclass must not move, add or drop a key. The key
lists below are the dicts the old ``status`` built, in their order.
"""

from __future__ import annotations

from cdc_relay.pg.report import PrimarySlot, SlotStatus, StandbySlot

TAIL = ["healthy", "problem", "problems", "warnings"]
PUBLICATION = ["publication", "publication_exists", "publication_tables"]
SLOT = [
    "plugin",
    "database",
    "active",
    "active_pid",
    "active_client",
    "failover",
    "confirmed_flush_lsn",
    "restart_lsn",
    "wal_status",
    "current_wal_lsn",
    "lag_bytes",
    "retained_wal_bytes",
    "safe_wal_size",
]


def primary_slot() -> PrimarySlot:
    return PrimarySlot(
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
        lag_bytes=16,
        retained_wal_bytes=24,
        safe_wal_size=None,
    )


def test_primary_with_slot_and_dead_letter_table() -> None:
    status = SlotStatus(
        role="primary",
        slot="s",
        slot_exists=True,
        primary=primary_slot(),
        publication="p",
        publication_exists=True,
        publication_tables=["public.outbox"],
        dead_letter_table_exists=True,
        dead_letters_pending=3,
    )
    shown = status.as_dict()
    head = ["role", "slot", "slot_exists"]
    assert list(shown) == [*head, *SLOT, *PUBLICATION, "dead_letters_pending", *TAIL]
    assert shown["lag_bytes"] == 16 and shown["dead_letters_pending"] == 3
    assert (shown["healthy"], shown["problem"], shown["problems"]) == (True, None, [])


def test_primary_without_slot_or_dead_letter_table_has_neither_key() -> None:
    status = SlotStatus(role="primary", slot="s", slot_exists=False, publication="p")
    status.problems += ["first", "second"]
    shown = status.as_dict()
    assert list(shown) == ["role", "slot", "slot_exists", *PUBLICATION, *TAIL]
    assert (shown["healthy"], shown["problem"]) == (False, "first")
    assert not status.healthy


def test_unreadable_dead_letters_show_as_null() -> None:
    status = SlotStatus(role="primary", slot="s", slot_exists=False, dead_letter_table_exists=True)
    assert status.as_dict()["dead_letters_pending"] is None


def test_standby_shows_its_copy_of_the_slot_only() -> None:
    standby = StandbySlot(
        failover=True,
        synced=True,
        temporary=False,
        failover_ready=True,
        confirmed_flush_lsn="0/10",
        replay_lsn="0/20",
    )
    shown = SlotStatus(role="standby", slot="s", slot_exists=True, standby=standby).as_dict()
    copy = [
        "failover",
        "synced",
        "temporary",
        "failover_ready",
        "confirmed_flush_lsn",
        "replay_lsn",
    ]
    assert list(shown) == ["role", "slot", "slot_exists", *copy, *TAIL]
    assert shown["failover_ready"] is True and shown["warnings"] == []

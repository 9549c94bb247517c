"""The progress lines of long commands: counts, rate, time left; one summary line."""

from __future__ import annotations

from cdc_relay.cli_progress import Meter, Progress


def test_a_known_total_shows_rate_and_time_left() -> None:
    meter = Progress("published", "row(s)", started=100.0, total=10_000)
    assert meter.line(2_500, now=105.0) == "published 2,500/10,000 row(s), 500/s, 15s left"
    assert meter.line(1_000, now=110.0).endswith("100/s, 1m30s left")
    assert "left" not in meter.line(10_000, now=120.0)


def test_an_unknown_total_shows_count_and_rate_only() -> None:
    meter = Progress("deleted", "outbox row(s)", started=0.0)
    assert meter.line(4_000, now=2.0) == "deleted 4,000 outbox row(s), 2,000/s"
    assert meter.line(0, now=0.0) == "deleted 0 outbox row(s), 0/s"  # no division by zero


def test_the_summary_is_one_line_with_its_numbers_for_json() -> None:
    meter = Progress("deleted", "outbox row(s)", started=10.0)
    assert meter.summary(7_200, now=7_210.0) == "deleted 7,200 outbox row(s) in 2h00m (1/s)"
    assert meter.fields(7_200, now=7_210.0) == {
        "done": 7_200,
        "total": None,
        "seconds": 7_200.0,
        "rate": 1.0,
    }


def test_a_meter_rewrites_the_terminal_line_and_only_notes_elsewhere() -> None:
    shown: list[str] = []
    noted: list[str] = []
    progress = Progress("replayed", "dead letter(s)", 0.0, total=100)
    on_terminal = Meter(progress, True, shown.append, noted.append)
    on_terminal.update(50, 10.0)
    assert shown == ["replayed 50/100 dead letter(s), 5/s, 10s left"] and noted == []
    elsewhere = Meter(progress, False, shown.append, noted.append)
    elsewhere.update(60, 10.0, " (detail)")
    assert noted == ["replayed 60/100 dead letter(s), 6/s, 7s left (detail)"]
    assert elsewhere.done == 60

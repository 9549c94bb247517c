"""The dead-letter log budget: lines of their own up to a budget, then one summary per window.

Pure unit tests (``cdc_relay.logbudget``) and the sink's use of it against a real
Postgres dead-letter table (every letter stored whatever the log says).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.deadletters import DeadLetter, DeadLetterSink, DeadLetterWriter
from cdc_relay.letters import PendingDeadLetter
from cdc_relay.logbudget import LogBudget
from tests.harness import Setup, unique_names


def test_the_first_letters_of_a_window_get_lines_the_rest_one_summary() -> None:
    budget = LogBudget(per_window=3, window=10.0)
    taken = [budget.take(0.0) for _ in range(5)]
    assert taken == [True, True, True, False, False]
    budget.skip("unroutable")
    budget.skip("bad_row")
    assert budget.due(4.0) == 6.0
    assert budget.summary(9.9) is None  # not before the window ends
    assert budget.summary(10.0) == (2, {"unroutable": 1, "bad_row": 1}, 10.0)
    assert budget.summary(10.0) is None and budget.due(10.0) is None  # said once
    assert budget.take(10.5)  # a new window: lines again


def test_a_window_with_letters_unlogged_restarts_only_after_its_summary() -> None:
    budget = LogBudget(per_window=1, window=1.0)
    assert budget.take(0.0)
    assert not budget.take(0.5)
    budget.skip("too_large")
    # Past the window, but the summary has not been given: no line may come before it.
    assert not budget.take(5.0)
    budget.skip("too_large")
    assert budget.summary(5.0) == (2, {"too_large": 2}, 5.0)
    assert budget.take(5.0)


def test_flush_says_what_is_left_when_the_session_ends() -> None:
    budget = LogBudget(per_window=0, window=60.0)
    assert not budget.take(0.0)
    budget.skip("unroutable")
    assert budget.flush(1.0) == (1, {"unroutable": 1}, 1.0)
    assert budget.flush(2.0) is None


@settings(max_examples=300, deadline=None)
@given(
    per_window=st.integers(0, 5),
    steps=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=60),
)
def test_every_letter_is_either_a_line_or_counted_in_exactly_one_summary(
    per_window: int, steps: list[float]
) -> None:
    budget = LogBudget(per_window=per_window, window=2.0)
    now, lines, summarised = 0.0, 0, 0
    for step in steps:
        now += step
        summary = budget.summary(now)
        if summary is not None:
            summarised += summary[0]
        if budget.take(now):
            lines += 1
        else:
            budget.skip("bad_row")
    final = budget.flush(now)
    summarised += final[0] if final else 0
    assert lines + summarised == len(steps)


@pytest.fixture
def outbox(pg_dsn: str) -> Iterator[Setup]:
    setup = Setup(pg_dsn, "amqp://guest:guest@127.0.0.1:1/", unique_names("lb"))
    setup.init()
    yield setup
    setup.cleanup()


@pytest.mark.asyncio
async def test_a_burst_of_dead_letters_is_stored_whole_and_logged_within_the_budget(
    outbox: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    writer = await DeadLetterWriter.connect(outbox.dsn, outbox.settings.dead_letter_table)
    stored: list[int] = []
    sink = DeadLetterSink(writer, stored.extend, budget=LogBudget(per_window=5, window=0.5))
    task = asyncio.create_task(sink.run())
    try:
        with caplog.at_level(logging.WARNING, logger="cdc_relay"):
            sink.put_nowait(
                PendingDeadLetter(n, DeadLetter(str(n), "unroutable", {}, 16, code="unroutable"))
                for n in range(1, 201)
            )
            await asyncio.wait_for(sink.wait_idle(), 30)
            assert stored == list(range(1, 201))
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 5 and all("dead-lettered outbox row" in m for m in lines)
            # No further letter arrives: the summary still comes when the window ends.
            for _ in range(100):
                if len(caplog.records) > 5:
                    break
                await asyncio.sleep(0.05)
            summary = caplog.records[5]
            assert "dead-lettered 195 more outbox row(s)" in summary.getMessage()
            assert "unroutable 195" in summary.getMessage()
            assert summary.dead_letters_not_logged == 195  # type: ignore[attr-defined]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.close()
    with psycopg.connect(outbox.dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {outbox.table}_dead_letter").fetchone()
    assert row is not None and row[0] == 200


@pytest.mark.asyncio
async def test_the_summary_of_a_session_that_ends_mid_window_is_still_logged(
    outbox: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    writer = await DeadLetterWriter.connect(outbox.dsn, outbox.settings.dead_letter_table)
    sink = DeadLetterSink(writer, lambda _: None, budget=LogBudget(per_window=1, window=3600))
    task = asyncio.create_task(sink.run())
    try:
        with caplog.at_level(logging.WARNING, logger="cdc_relay"):
            sink.put_nowait(
                PendingDeadLetter(n, DeadLetter(str(n), "bad", {}, 16, code="bad_row"))
                for n in range(1, 4)
            )
            await asyncio.wait_for(sink.wait_idle(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await writer.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "dead-lettered 2 more outbox row(s)" in messages[1], messages

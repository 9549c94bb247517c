"""health.py without servers: what a look at the catalogs means, problems, a waiting flush."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cdc_relay.health import (
    DriftStep,
    DriftWatch,
    FlushWatch,
    Problems,
    drift_since,
    judge_drift,
    since_when,
)

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def judge(current: int | None, covered: bool, started: int = 100) -> object:
    return judge_drift(
        publication="pub",
        table="public.outbox",
        started_relid=started,
        current_relid=current,
        covered=covered,
        since=T0,
        slot="s1",
    )


def test_covered_outbox_is_no_drift() -> None:
    assert judge(100, True) is None


def test_uncovered_outbox_names_the_fix_and_the_resync() -> None:
    drift = judge(100, False)
    assert drift is not None and not drift.end_session  # type: ignore[attr-defined]
    message = drift.message  # type: ignore[attr-defined]
    assert "Run `ALTER PUBLICATION pub ADD TABLE public.outbox`" in message
    assert "`cdc-relay drop --slot s1 --force --yes`" in message
    assert "`cdc-relay resync --slot s1 --since 2026-12-01T10:00:00+00:00`" in message


def test_a_recreated_outbox_ends_the_session_only_once_covered() -> None:
    adopt = judge(200, True)
    assert adopt is not None and adopt.end_session  # type: ignore[attr-defined]
    assert "OID 100 -> 200" in adopt.message  # type: ignore[attr-defined]
    waiting = judge(200, False)
    assert waiting is not None and not waiting.end_session  # type: ignore[attr-defined]
    assert "ADD TABLE public.outbox" in waiting.message  # type: ignore[attr-defined]


def test_a_dropped_outbox_is_said_and_the_session_goes_on() -> None:
    drift = judge(None, False)
    assert drift is not None and not drift.end_session  # type: ignore[attr-defined]
    assert "was dropped" in drift.message and "cdc-relay init" in drift.message  # type: ignore[attr-defined]


def test_a_tableless_outbox_has_nothing_to_drift() -> None:
    assert judge(None, False, started=0) is None
    assert judge(300, False, started=0) is None


def test_drift_since_is_the_last_confirmed_commit_minus_the_margin() -> None:
    commit = T0.timestamp()
    assert drift_since(commit, commit + 3600) == T0 - timedelta(minutes=15)
    assert drift_since(None, commit) == T0 - timedelta(minutes=15)


def test_problems_keep_their_start_and_summarise_oldest_first() -> None:
    problems = Problems()
    assert problems.summary() == (None, None)
    problems.report("dead-letters", "writes fail", T0 + timedelta(seconds=5))
    problems.report("publication", "drift", T0)
    problems.report("dead-letters", "writes still fail", T0 + timedelta(seconds=50))
    assert problems.summary() == ("drift; writes still fail", T0)
    version = problems.version
    problems.report("publication", "drift", T0 + timedelta(seconds=90))
    assert problems.version == version  # the same report again is no change
    problems.clear("publication")
    problems.clear("publication")
    assert problems.summary() == ("writes still fail", T0 + timedelta(seconds=5))
    assert problems.get("publication") is None


def test_flush_watch_counts_only_while_messages_wait() -> None:
    watch = FlushWatch()
    assert watch.update(10, 0, T0) is None
    assert watch.update(10, 3, T0 + timedelta(seconds=1)) == T0 + timedelta(seconds=1)
    assert watch.update(10, 3, T0 + timedelta(seconds=9)) == T0 + timedelta(seconds=1)
    assert watch.update(20, 1, T0 + timedelta(seconds=10)) == T0 + timedelta(seconds=10)
    assert watch.update(20, 0, T0 + timedelta(seconds=11)) is None


def test_since_when_keeps_the_first_time() -> None:
    first = since_when(True, None, T0)
    assert since_when(True, first, T0 + timedelta(seconds=9)) == T0
    assert since_when(False, first, T0 + timedelta(seconds=10)) is None


def watch() -> DriftWatch:
    return DriftWatch(publication="pub", table="public.outbox", slot="s1", outbox_relid=100)


def test_a_drift_is_said_once_then_its_end_names_the_skipped_rows() -> None:
    w, commit = watch(), T0.timestamp()
    assert w.observe(100, True, commit, commit + 60) == DriftStep()
    first = w.observe(100, False, commit, commit + 60)
    assert first.error is not None and first.error == first.problem
    assert "since about 2026-12-01T09:45:00+00:00" in first.error
    # Later looks keep the first start (the confirmed commit moved on meanwhile) and stay quiet.
    again = w.observe(100, False, commit + 600, commit + 900)
    assert again.error is None and again.problem == first.problem
    ended = w.observe(100, True, commit + 600, commit + 905)
    assert ended.ended and ended.problem is None and ended.end_session is None
    assert ended.error is not None and "covers the outbox again" in ended.error
    assert "--since 2026-12-01T09:45:00+00:00" in ended.error
    assert w.observe(100, True, commit + 600, commit + 910).error is None


def test_a_recreated_outbox_ends_the_session_and_names_rows_written_before_it_joined() -> None:
    w, commit = watch(), T0.timestamp()
    dropped = w.observe(None, False, commit, commit + 5)
    assert dropped.problem is not None and "was dropped" in dropped.problem
    waiting = w.observe(200, False, commit, commit + 10)
    assert waiting.error is not None and "ADD TABLE public.outbox" in waiting.error
    adopt = w.observe(200, True, commit, commit + 15)
    assert adopt.ended and adopt.end_session is not None
    assert "OID 100 -> 200" in adopt.end_session and "resync --slot s1" in adopt.end_session

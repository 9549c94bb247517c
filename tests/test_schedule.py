"""The status timer and the Postgres liveness rule, on a fake clock."""

from __future__ import annotations

from cdc_relay.pg.schedule import STATUS_MIN_GAP, Probe, Send, StatusSchedule


def test_first_update_goes_out_at_once_then_every_interval() -> None:
    schedule = StatusSchedule(interval=1.0, timeout=30.0, now=100.0)
    assert schedule.decide(100.0, due=False, silent=None) == Send(reply_requested=False)
    schedule.sent(100.0)
    assert schedule.decide(100.5, due=False, silent=None) is None
    assert schedule.wait_time(100.5, due=False) == 0.5
    assert schedule.decide(101.0, due=False, silent=None) == Send(reply_requested=False)


def test_a_due_update_goes_out_early_but_never_closer_than_the_min_gap() -> None:
    schedule = StatusSchedule(interval=1.0, timeout=30.0, now=0.0)
    schedule.sent(10.0)
    assert schedule.decide(10.005, due=True, silent=None) is None
    assert abs(schedule.wait_time(10.005, due=True) - (STATUS_MIN_GAP - 0.005)) < 1e-9
    assert schedule.decide(10.001 + STATUS_MIN_GAP, due=True, silent=None) == Send(False)


def test_no_storm_a_thousand_wakeups_in_one_second_send_at_most_one_per_gap() -> None:
    schedule = StatusSchedule(interval=1.0, timeout=30.0, now=0.0)
    sent = 0
    for i in range(1000):
        now = i / 1000
        if schedule.decide(now, due=True, silent=None) is not None:
            schedule.sent(now)
            sent += 1
    assert sent <= 1 / STATUS_MIN_GAP + 1


def test_silence_asks_for_a_reply_after_a_third_and_probes_after_the_timeout() -> None:
    schedule = StatusSchedule(interval=1.0, timeout=30.0, now=0.0)
    schedule.sent(0.0)
    assert schedule.decide(5.0, due=False, silent=5.0) == Send(reply_requested=False)
    schedule.sent(5.0)
    assert schedule.decide(10.5, due=False, silent=10.5) == Send(reply_requested=True)
    schedule.sent(10.5)
    assert schedule.decide(30.5, due=False, silent=30.5) == Probe(30.5)


def test_silence_while_we_are_not_waiting_for_data_is_not_death() -> None:
    """Our own back-pressure (a full window) is not the server's silence."""
    schedule = StatusSchedule(interval=1.0, timeout=30.0, now=0.0)
    schedule.sent(99.0)
    assert schedule.decide(100.0, due=False, silent=None) == Send(reply_requested=False)


def test_interval_is_capped_at_a_quarter_of_the_timeout() -> None:
    schedule = StatusSchedule(interval=30.0, timeout=8.0, now=0.0)
    schedule.sent(0.0)
    assert schedule.decide(2.0, due=False, silent=None) == Send(False)


def test_a_reprieve_grants_another_full_timeout_then_probes_again() -> None:
    """A walsender busy decoding a long transaction: alive, silent, not to be given up on."""
    schedule = StatusSchedule(interval=1.0, timeout=30.0, now=0.0)
    schedule.sent(30.0)
    assert schedule.decide(31.0, due=False, silent=31.0) == Probe(31.0)
    schedule.reprieve(31.0)
    assert schedule.decide(45.0, due=False, silent=45.0) == Send(reply_requested=True)
    schedule.sent(45.0)
    assert schedule.decide(61.5, due=False, silent=61.5) == Probe(61.5)
    # data arrives: silence restarts from zero, the reprieve does not matter any more
    assert schedule.decide(62.0, due=False, silent=0.5) == Send(reply_requested=False)

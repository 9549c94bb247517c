"""The pause between sessions: exponential with jitter, capped after a broker refusal."""

from __future__ import annotations

from cdc_relay.backoff import REFUSED_BACKOFF_MAX, reconnect_delay


def highest(low: float, high: float) -> float:
    """The largest draw ``random.uniform`` can give: the ceiling itself."""
    return high


def lowest(low: float, high: float) -> float:
    return low


def test_backoff_doubles_up_to_the_maximum_and_never_drops_below_the_minimum() -> None:
    ceilings = [reconnect_delay(n, 0.5, 30.0, uniform=highest) for n in range(8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert reconnect_delay(5, 0.5, 30.0, uniform=lowest) == 0.5
    assert reconnect_delay(10**6, 0.5, 30.0, uniform=highest) == 30.0  # no overflow


def test_after_a_refusal_the_pause_stays_within_seconds_however_many_attempts() -> None:
    """Two quorum members down: the nacks come at once, the majority comes back any moment."""
    for attempt in range(40):
        delay = reconnect_delay(attempt, 0.5, 30.0, refused=True, uniform=highest)
        assert 0.5 <= delay <= REFUSED_BACKOFF_MAX <= 3.0
    assert reconnect_delay(0, 0.5, 30.0, refused=True, uniform=highest) == 0.5
    assert reconnect_delay(0, 0.5, 30.0, refused=True, uniform=lowest) == 0.5


def test_the_refusal_cap_never_lowers_the_configured_minimum_or_raises_the_maximum() -> None:
    assert reconnect_delay(9, 5.0, 60.0, refused=True, uniform=highest) == 5.0
    assert reconnect_delay(9, 0.1, 1.0, refused=True, uniform=highest) == 1.0

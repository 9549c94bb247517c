"""The lock-free loop counters and histogram render exactly as prometheus_client's own."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cdc_relay.metrics import (
    COMMIT_TO_CONFIRM_BUCKETS,
    LoopCounter,
    LoopHistogram,
    Metrics,
    _LoopCollector,
)


def _samples(registry: CollectorRegistry) -> list[str]:
    """Exposition lines without comments and without prometheus_client's _created samples."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line and "_created" not in line[:80]]


values = st.one_of(
    st.sampled_from(COMMIT_TO_CONFIRM_BUCKETS),  # exactly on an edge: le means <=
    st.floats(min_value=0, max_value=1000, allow_nan=False),
)


@given(st.lists(values, max_size=50), st.integers(min_value=0, max_value=10**6))
def test_loop_metrics_render_like_prometheus_client(observed: list[float], count: int) -> None:
    reference = CollectorRegistry()
    histogram = Histogram("h_seconds", "doc", buckets=COMMIT_TO_CONFIRM_BUCKETS, registry=reference)
    counter = Counter("c", "doc", registry=reference)
    ours = CollectorRegistry()
    loop_histogram = LoopHistogram("h_seconds", "doc", COMMIT_TO_CONFIRM_BUCKETS)
    loop_counter = LoopCounter("c", "doc")
    ours.register(_LoopCollector([loop_counter], [loop_histogram]))
    for value in observed:
        histogram.observe(value)
        loop_histogram.observe(value)
    counter.inc(count)
    loop_counter.inc(count)
    assert sorted(_samples(ours)) == sorted(_samples(reference))


def test_relay_metrics_names() -> None:
    metrics = Metrics()
    metrics.published.inc()
    metrics.confirmed.inc(2)
    text = metrics.render().decode()
    assert "cdc_relay_messages_published_total 1.0" in text
    assert "cdc_relay_messages_confirmed_total 2.0" in text
    assert "cdc_relay_transactions_total 0.0" in text
    assert 'cdc_relay_commit_to_confirm_seconds_bucket{le="+Inf"} 0.0' in text
    assert metrics.confirmed_count() == 2

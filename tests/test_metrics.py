"""The lock-free loop counters and histogram render exactly as prometheus_client's own;
every series names its slot; /readyz follows the role; the metrics HTTP server
holds out against a client that can reach its port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cdc_relay import reasons
from cdc_relay.metrics import (
    COMMIT_TO_CONFIRM_BUCKETS,
    ROLES,
    WAL_STATUSES,
    LoopCounter,
    LoopHistogram,
    Metrics,
    MetricsServer,
    _LoopCollector,
)
from cdc_relay.pg.report import PrimarySlot, SlotStatus


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
    metrics = Metrics("s1")
    metrics.published.inc()
    metrics.confirmed.inc(2)
    text = metrics.render().decode()
    assert 'cdc_relay_messages_published_total{slot="s1"} 1.0' in text
    assert 'cdc_relay_messages_confirmed_total{slot="s1"} 2.0' in text
    assert 'cdc_relay_transactions_total{slot="s1"} 0.0' in text
    assert 'cdc_relay_commit_to_confirm_seconds_bucket{le="+Inf",slot="s1"} 0.0' in text
    assert metrics.confirmed_count() == 2


def _series(metrics: Metrics) -> list[str]:
    return [line for line in metrics.render().decode().splitlines() if not line.startswith("#")]


def test_every_relay_series_names_its_slot_and_none_is_created() -> None:
    """Several relays in one Prometheus are told apart by slot; no *_created series at all."""
    metrics = Metrics("orders_slot")
    metrics.publish_failures.inc(reasons.NACK)
    metrics.dead_lettered.inc(reasons.UNROUTABLE, 3)
    metrics.observe_slot(_status(_primary(lag=10, retained=20, safe=None, wal_status="reserved")))
    series = _series(metrics)
    relay = [line for line in series if line.startswith("cdc_relay_")]
    assert relay and all('slot="orders_slot"' in line for line in relay), relay
    assert not [line for line in series if "_created" in line.split(" ")[0]]
    names = {line.split("{")[0].split(" ")[0] for line in series}
    assert {"process_resident_memory_bytes", "process_start_time_seconds", "python_info"} <= names
    text = "\n".join(series)
    assert 'slot="orders_slot",version="' in text.split("cdc_relay_build_info{", 1)[1]
    assert 'cdc_relay_publish_failures_total{reason="nack",slot="orders_slot"} 1.0' in text
    assert 'cdc_relay_publish_failures_total{reason="timeout",slot="orders_slot"} 0.0' in text
    assert (
        'cdc_relay_messages_dead_lettered_total{reason="unroutable",slot="orders_slot"} 3.0' in text
    )
    for name in (
        "cdc_relay_in_flight_messages",
        "cdc_relay_in_flight_bytes",
        "cdc_relay_amqp_blocked",
        "cdc_relay_last_confirm_timestamp_seconds",
        "cdc_relay_slot_poll_failures_total",
    ):
        assert name in names, name


def _primary(
    *, lag: int | None, retained: int | None, safe: int | None, wal_status: str | None
) -> PrimarySlot:
    return PrimarySlot(
        plugin="pgoutput",
        database="db",
        active=True,
        active_pid=1,
        active_client=None,
        failover=None,
        confirmed_flush_lsn="0/10",
        restart_lsn="0/8",
        wal_status=wal_status,
        current_wal_lsn="0/20",
        lag_bytes=lag,
        retained_wal_bytes=retained,
        safe_wal_size=safe,
    )


def _status(primary: PrimarySlot | None, pending: int | None = 4) -> SlotStatus:
    return SlotStatus(
        role="primary",
        slot="s",
        slot_exists=primary is not None,
        primary=primary,
        dead_letter_table_exists=pending is not None,
        dead_letters_pending=pending,
    )


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"slot": metrics.slot, **labels})


def test_slot_poll_numbers_become_gauges() -> None:
    metrics = Metrics("s")
    assert _value(metrics, "cdc_relay_slot_lag_bytes") is None  # absent before the first poll
    metrics.observe_slot(_status(_primary(lag=100, retained=300, safe=5000, wal_status="extended")))
    assert _value(metrics, "cdc_relay_slot_lag_bytes") == 100
    assert _value(metrics, "cdc_relay_slot_retained_wal_bytes") == 300
    assert _value(metrics, "cdc_relay_slot_safe_wal_size_bytes") == 5000
    assert _value(metrics, "cdc_relay_slot_active") == 1
    assert _value(metrics, "cdc_relay_dead_letters_pending") == 4
    states = {s: _value(metrics, "cdc_relay_slot_wal_status", status=s) for s in WAL_STATUSES}
    assert states == {"reserved": 0, "extended": 1, "unreserved": 0, "lost": 0}
    # Unlimited max_slot_wal_keep_size: safe_wal_size is NULL, the gauge NaN.
    metrics.observe_slot(_status(_primary(lag=0, retained=0, safe=None, wal_status="reserved")))
    assert math.isnan(_value(metrics, "cdc_relay_slot_safe_wal_size_bytes") or 0.0)
    assert _value(metrics, "cdc_relay_slot_lag_bytes") == 0
    # The slot is gone: no numbers, not active, no wal_status.
    metrics.observe_slot(_status(None, pending=None))
    assert math.isnan(_value(metrics, "cdc_relay_slot_lag_bytes") or 0.0)
    assert math.isnan(_value(metrics, "cdc_relay_dead_letters_pending") or 0.0)
    assert _value(metrics, "cdc_relay_slot_active") == 0
    assert not any(_value(metrics, "cdc_relay_slot_wal_status", status=s) for s in WAL_STATUSES)


@pytest.mark.parametrize(
    ("role", "streaming", "ready"),
    [
        ("starting", False, False),
        ("starting", True, False),
        ("active", True, True),
        ("active", False, False),  # active but not streaming (a publication drift)
        ("standby", False, True),  # waiting correctly for the slot
    ],
)
def test_ready_in_role(role: str, streaming: bool, ready: bool) -> None:
    metrics = Metrics("s")
    metrics.set_role(role)
    metrics.ready.set(1 if streaming else 0)
    assert metrics.ready_in_role() is ready
    roles = {r: _value(metrics, "cdc_relay_role", role=r) for r in ROLES}
    assert roles == {r: (1.0 if r == role else 0.0) for r in ROLES}


@pytest.mark.asyncio
async def test_readyz_answers_200_for_a_standby() -> None:
    """A standby that answers 503 for ever never lets a two-replica Deployment roll out."""
    async with serving() as server:
        server.metrics.set_role("standby")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
        assert (await status_of(reader, 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        server.metrics.set_role("starting")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
        assert (await status_of(reader, 5)).startswith(b"HTTP/1.1 503 ")
        writer.close()


# --------------------------------------------------------------------------- the HTTP server
# Against the real MetricsServer on loopback, with its default limits: each test
# is what an unauthenticated client that can reach the port could do.


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[MetricsServer]:
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def status_of(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """The status line the server answers with (b"" when it closes without one)."""
    async with asyncio.timeout(within_s):
        return await reader.readline()


@pytest.mark.asyncio
async def test_an_oversized_request_gets_431_and_no_asyncio_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with serving() as server:
        for request in (
            b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n",  # one line over 64 KiB
            b"GET / HTTP/1.1\r\n" + (b"X-Pad: " + b"b" * 1000 + b"\r\n") * 80,  # many lines
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            assert (await status_of(reader, 5)).startswith(b"HTTP/1.1 431 "), request[:20]
            writer.close()
        # The server still answers afterwards.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (await status_of(reader, 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.asyncio
async def test_a_dribbling_client_is_cut_off_at_one_request_deadline() -> None:
    """A header line every second used to reset a per-line 5 s timeout forever."""
    async with serving() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        began = time.monotonic()
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        closed_after = None
        for i in range(9):  # bounded: 9 s at most
            await asyncio.sleep(1)
            with contextlib.suppress(ConnectionError):
                writer.write(f"X-Drip-{i}: 1\r\n".encode())
                await writer.drain()
            try:
                async with asyncio.timeout(0.05):
                    closed = await reader.read(100) == b""
            except TimeoutError:
                closed = False
            except ConnectionError:
                closed = True
            if closed:
                closed_after = time.monotonic() - began
                break
        writer.close()
    assert closed_after is not None, "the dribbling connection was still open after 9 s"
    assert 4.5 <= closed_after <= 7, closed_after


@pytest.mark.asyncio
async def test_connections_over_the_cap_are_refused_at_once() -> None:
    """100 half-sent requests: the first 64 wait for their deadline, the rest get a 503."""
    async with serving() as server:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(100)]
        for _, writer in held:
            writer.write(b"GET /metrics HTTP/1.1\r\n")
        answers = await asyncio.gather(
            *(status_of(reader, 2) for reader, _ in held), return_exceptions=True
        )
        busy = [a for a in answers if isinstance(a, bytes) and a.startswith(b"HTTP/1.1 503 ")]
        waiting = [a for a in answers if isinstance(a, TimeoutError)]
        assert (len(busy), len(waiting)) == (36, 64)
        for _, writer in held:
            writer.close()

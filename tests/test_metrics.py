"""The lock-free loop counters and histogram render exactly as prometheus_client's own;
the metrics HTTP server holds out against a client that can reach its port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cdc_relay.metrics import (
    COMMIT_TO_CONFIRM_BUCKETS,
    LoopCounter,
    LoopHistogram,
    Metrics,
    MetricsServer,
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

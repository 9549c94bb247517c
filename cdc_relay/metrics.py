"""Prometheus metrics plus /healthz and /readyz on one small asyncio HTTP server.

prometheus_client's own server runs in a thread and knows nothing of readiness,
so the relay serves the three paths itself from its own event loop: if the loop
is stuck, /healthz stops answering, which is what a liveness probe should see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cdc_relay.deadline import within

log = logging.getLogger(__name__)

# Fine below 25 ms, where a healthy relay lives; coarse above, where a backlog
# or an outage shows up. 5 ms and 25 ms are bucket edges so that "p50 < 5 ms,
# p99 < 25 ms" can be read off exactly.
COMMIT_TO_CONFIRM_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class LoopCounter:
    """A counter bumped per message on the event loop and read by the same loop.

    prometheus_client's Counter takes a lock on every ``inc`` (3-4% of the
    relay's CPU when it was used per message); the relay is single-threaded and
    serves /metrics from its own loop, so a plain int is enough.
    """

    __slots__ = ("documentation", "name", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LoopHistogram:
    """A histogram observed on the event loop: plain ints, a bisect, no lock (see LoopCounter)."""

    __slots__ = ("bounds", "counts", "documentation", "name", "sum")

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class _LoopCollector:
    def __init__(self, counters: list[LoopCounter], histograms: list[LoopHistogram]) -> None:
        self.counters = counters
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        for counter in self.counters:
            yield CounterMetricFamily(counter.name, counter.documentation, value=counter.value)
        for h in self.histograms:
            yield HistogramMetricFamily(
                h.name, h.documentation, buckets=h.cumulative(), sum_value=h.sum
            )


class Metrics:
    """The relay's counters; one registry per relay so tests can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.published = LoopCounter(
            "cdc_relay_messages_published", "Messages handed to the broker"
        )
        self.confirmed = LoopCounter(
            "cdc_relay_messages_confirmed", "Messages confirmed by the broker"
        )
        self.transactions = LoopCounter("cdc_relay_transactions", "Committed transactions received")
        self.commit_to_confirm = LoopHistogram(
            "cdc_relay_commit_to_confirm_seconds",
            "Per transaction: from its commit in Postgres (the commit timestamp) to the"
            " broker's confirm of its last message",
            COMMIT_TO_CONFIRM_BUCKETS,
        )
        r.register(
            _LoopCollector(
                [self.published, self.confirmed, self.transactions], [self.commit_to_confirm]
            )
        )
        self.publish_failures = Counter(
            "cdc_relay_publish_failures", "Publishes nacked, returned or lost", registry=r
        )
        self.dead_lettered = Counter(
            "cdc_relay_messages_dead_lettered", "Rows moved to the dead-letter table", registry=r
        )
        self.reconnects = Counter(
            "cdc_relay_reconnects", "Sessions ended and restarted", registry=r
        )
        self.flush_lsn = Gauge(
            "cdc_relay_flush_lsn", "Last flush LSN reported to Postgres (bytes)", registry=r
        )
        self.received_lsn = Gauge(
            "cdc_relay_received_lsn", "Highest WAL position received (bytes)", registry=r
        )
        self.ready = Gauge(
            "cdc_relay_ready", "1 while streaming with both connections up", registry=r
        )

    def confirmed_count(self) -> float:
        return self.confirmed.value

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics, /healthz (process alive) and /readyz (streaming).

    The port is reachable by anything that can reach the pod, so a client gets
    one deadline for its whole request (not one per line: a header every 3 s
    held a connection forever), at most ``max_request_bytes`` of request (431
    beyond, instead of an asyncio traceback), and at most ``max_connections``
    at once (a 503 beyond, instead of an unbounded number of held sockets).
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        request_deadline: float = 5.0,
        max_connections: int = 64,
        max_request_bytes: int = 64 * 1024,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.request_deadline = request_deadline
        self.max_connections = max_connections
        self.max_request_bytes = max_request_bytes
        self._open = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=self.max_request_bytes
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line, after the headers; None when the request is too large."""
        request = b""
        size = 0
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # one line over the stream limit
                return None
            size += len(line)
            if size > self.max_request_bytes:
                return None
            if not request:
                request = line
            elif line in (b"\r\n", b"\n"):
                return request
            if not line or not line.endswith(b"\n"):
                return request  # EOF

    def _respond(self, request: bytes) -> tuple[str, bytes, str]:
        parts = request.decode("latin-1").split()
        path = parts[1] if len(parts) > 1 else "/"
        if path == "/metrics":
            return "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/readyz":
            if self.metrics.ready._value.get():
                return "200 OK", b"ready\n", "text/plain"
            return "503 Service Unavailable", b"not ready\n", "text/plain"
        return "404 Not Found", b"not found\n", "text/plain"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > self.max_connections:
                status, body, ctype = "503 Service Unavailable", b"busy\n", "text/plain"
            else:
                request = await within(self._read_request(reader), self.request_deadline)
                if request is None:
                    status, body, ctype = (
                        "431 Request Header Fields Too Large",
                        b"request too large\n",
                        "text/plain",
                    )
                else:
                    status, body, ctype = self._respond(request)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await within(writer.drain(), self.request_deadline)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await within(writer.wait_closed(), 1)

"""Prometheus metrics plus /healthz and /readyz on one small asyncio HTTP server.

prometheus_client's own server runs in a thread and knows nothing of readiness,
so the relay serves the three paths itself from its own event loop: if the loop
is stuck, /healthz stops answering, which is what a liveness probe should see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# Fine below 25 ms, where a healthy relay lives; coarse above, where a backlog
# or an outage shows up. 5 ms and 25 ms are bucket edges so that "p50 < 5 ms,
# p99 < 25 ms" can be read off exactly.
COMMIT_TO_CONFIRM_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class Metrics:
    """The relay's counters; one registry per relay so tests can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "cdc_relay_messages_published", "Messages handed to the broker", registry=r
        )
        self.confirmed = Counter(
            "cdc_relay_messages_confirmed", "Messages confirmed by the broker", registry=r
        )
        self.publish_failures = Counter(
            "cdc_relay_publish_failures", "Publishes nacked, returned or lost", registry=r
        )
        self.dead_lettered = Counter(
            "cdc_relay_messages_dead_lettered", "Rows moved to the dead-letter table", registry=r
        )
        self.transactions = Counter(
            "cdc_relay_transactions", "Committed transactions received", registry=r
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
        self.commit_to_confirm = Histogram(
            "cdc_relay_commit_to_confirm_seconds",
            "Per transaction: from its commit in Postgres (the commit timestamp) to the"
            " broker's confirm of its last message",
            buckets=COMMIT_TO_CONFIRM_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            "cdc_relay_ready", "1 while streaming with both connections up", registry=r
        )

    def confirmed_count(self) -> float:
        return self.confirmed._value.get()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics, /healthz (process alive) and /readyz (streaming)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path == "/metrics":
                status, body, ctype = "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, body, ctype = "200 OK", b"ok\n", "text/plain"
            elif path == "/readyz":
                if self.metrics.ready._value.get():
                    status, body, ctype = "200 OK", b"ready\n", "text/plain"
                else:
                    status, body, ctype = "503 Service Unavailable", b"not ready\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

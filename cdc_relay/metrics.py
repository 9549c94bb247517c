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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cdc_relay import __version__, accel, reasons
from cdc_relay.deadline import within

if TYPE_CHECKING:
    from cdc_relay.pg.report import SlotStatus

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
    serves /metrics from its own loop, so a plain int is enough. It renders no
    ``_created`` sample (a reset shows in the process's start time).
    """

    __slots__ = ("documentation", "labels", "name", "value")

    def __init__(self, name: str, documentation: str, labels: dict[str, str] | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels or {}
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class ReasonCounter:
    """A loop counter with a ``reason`` label from a fixed set (``reasons``), each at 0 first.

    Every reason is rendered from the start, so ``rate()`` by reason has a series
    to work on before the first failure; an unknown code is counted all the same.
    """

    __slots__ = ("documentation", "labels", "name", "values")

    def __init__(
        self,
        name: str,
        documentation: str,
        reasons: tuple[str, ...],
        labels: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels or {}
        self.values = dict.fromkeys(reasons, 0)

    def inc(self, reason: str, amount: int = 1) -> None:
        self.values[reason] = self.values.get(reason, 0) + amount

    @property
    def value(self) -> int:
        return sum(self.values.values())


class LoopHistogram:
    """A histogram observed on the event loop: plain ints, a bisect, no lock (see LoopCounter)."""

    __slots__ = ("bounds", "counts", "documentation", "labels", "name", "sum")

    def __init__(
        self,
        name: str,
        documentation: str,
        bounds: tuple[float, ...],
        labels: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self.labels = labels or {}
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
    """Renders the loop counters; counters sharing a name (one per table) are one family."""

    def __init__(
        self,
        counters: (
            list[LoopCounter | ReasonCounter] | Callable[[], list[LoopCounter | ReasonCounter]]
        ),
        histograms: list[LoopHistogram],
    ) -> None:
        self.counters = counters
        self.histograms = histograms

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        counters = self.counters() if callable(self.counters) else self.counters
        for counter in counters:
            names, values = list(counter.labels), list(counter.labels.values())
            family = families.get(counter.name)
            if isinstance(counter, ReasonCounter):
                if family is None:
                    family = families[counter.name] = CounterMetricFamily(
                        counter.name, counter.documentation, labels=[*names, "reason"]
                    )
                for reason, count in counter.values.items():
                    family.add_metric([*values, reason], count)
            else:
                if family is None:
                    family = families[counter.name] = CounterMetricFamily(
                        counter.name, counter.documentation, labels=names
                    )
                family.add_metric(values, counter.value)
        yield from families.values()
        for h in self.histograms:
            histogram = HistogramMetricFamily(h.name, h.documentation, labels=list(h.labels))
            histogram.add_metric(list(h.labels.values()), h.cumulative(), h.sum)
            yield histogram


class TableCounters:
    """The per-row counters of one outbox table: ``slot`` and ``table`` labels.

    The session core bumps the counters of the row's own table (``core.Outbox``),
    so several outboxes on one slot are told apart by their ``table`` label.
    """

    __slots__ = ("confirmed", "dead_lettered", "published", "table")

    def __init__(self, slot: str, table: str | None) -> None:
        on = {"slot": slot} if table is None else {"slot": slot, "table": table}
        self.table = table or ""
        self.published = LoopCounter(
            "cdc_relay_messages_published", "Messages handed to the broker", on
        )
        self.confirmed = LoopCounter(
            "cdc_relay_messages_confirmed", "Messages confirmed by the broker", on
        )
        self.dead_lettered = ReasonCounter(
            "cdc_relay_messages_dead_lettered",
            "Rows moved to the dead-letter table, by reason",
            reasons.DEAD_LETTER_REASONS,
            on,
        )


class CounterTotal:
    """One counter summed over the tables (``Metrics.published`` and the like): read only."""

    def __init__(self, parts: Callable[[], Iterable[LoopCounter | ReasonCounter]]) -> None:
        self._parts = parts

    @property
    def value(self) -> int:
        return sum(part.value for part in self._parts())

    def inc(self, *args: Any) -> None:
        """Count on the first table's counter (a relay of one table, tests)."""
        next(iter(self._parts())).inc(*args)

    @property
    def values(self) -> dict[str, int]:
        """By reason, for a ReasonCounter."""
        total: dict[str, int] = {}
        for part in self._parts():
            assert isinstance(part, ReasonCounter)
            for reason, count in part.values.items():
                total[reason] = total.get(reason, 0) + count
        return total


ROLES: Final = ("active", "standby", "starting")
WAL_STATUSES: Final = ("reserved", "extended", "unreserved", "lost")


class Metrics:
    """The relay's metrics; one registry per relay so tests can run several.

    Every ``cdc_relay_*`` series carries ``slot``, so one Prometheus and one
    dashboard tell many relays apart; the per-row counters (published, confirmed,
    dead-lettered) also carry ``table``, one series per outbox of the slot
    (``tables``). Counters are loop counters (no lock, no ``_created``); gauges
    are set from the background loops, never per row.
    """

    def __init__(self, slot: str = "", tables: Sequence[str] = ()) -> None:
        self.slot = slot
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        on = {"slot": slot}
        self._tables: dict[str, TableCounters] = {}
        # Without tables (tests, tools): one group of per-row counters without a table label.
        self._default = None if tables else TableCounters(slot, None)
        if self._default is not None:
            self._tables[""] = self._default
        for table in tables:
            self.table(table)
        self.published = CounterTotal(lambda: [t.published for t in self._tables.values()])
        self.confirmed = CounterTotal(lambda: [t.confirmed for t in self._tables.values()])
        self.dead_lettered = CounterTotal(lambda: [t.dead_lettered for t in self._tables.values()])
        self.transactions = LoopCounter(
            "cdc_relay_transactions", "Committed transactions received", on
        )
        self.publish_failures = ReasonCounter(
            "cdc_relay_publish_failures",
            "Publishes nacked, returned or lost, by reason",
            reasons.PUBLISH_FAILURE_REASONS,
            on,
        )
        self.reconnects = LoopCounter("cdc_relay_reconnects", "Sessions ended and restarted", on)
        self.slot_poll_failures = LoopCounter(
            "cdc_relay_slot_poll_failures", "Slot polls that failed (the stream goes on)", on
        )
        self.commit_to_confirm = LoopHistogram(
            "cdc_relay_commit_to_confirm_seconds",
            "Per transaction: from its commit in Postgres (the commit timestamp) to the"
            " broker's confirm of its last message",
            COMMIT_TO_CONFIRM_BUCKETS,
            on,
        )
        session_counters: list[LoopCounter | ReasonCounter] = [
            self.transactions,
            self.publish_failures,
            self.reconnects,
            self.slot_poll_failures,
        ]

        def counters() -> list[LoopCounter | ReasonCounter]:
            per_table: list[LoopCounter | ReasonCounter] = []
            for kind in ("published", "confirmed", "dead_lettered"):
                per_table += [getattr(t, kind) for t in self._tables.values()]
            return per_table + session_counters

        r.register(_LoopCollector(counters, [self.commit_to_confirm]))

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, ["slot", *labels], registry=r)

        self.flush_lsn = gauge(
            "cdc_relay_flush_lsn", "Last flush LSN reported to Postgres (bytes)"
        ).labels(slot)
        self.received_lsn = gauge(
            "cdc_relay_received_lsn", "Highest WAL position received (bytes)"
        ).labels(slot)
        self.ready = gauge("cdc_relay_ready", "1 while streaming with both connections up").labels(
            slot
        )
        self.in_flight_messages = gauge(
            "cdc_relay_in_flight_messages", "Messages published and not yet confirmed"
        ).labels(slot)
        self.in_flight_bytes = gauge(
            "cdc_relay_in_flight_bytes", "Body bytes published and not yet confirmed"
        ).labels(slot)
        self.amqp_blocked = gauge(
            "cdc_relay_amqp_blocked", "1 while RabbitMQ has blocked the connection (an alarm)"
        ).labels(slot)
        self.last_confirm = gauge(
            "cdc_relay_last_confirm_timestamp_seconds",
            "Unix time the broker last confirmed a message (to within a second)",
        ).labels(slot)
        self._role = gauge(
            "cdc_relay_role", "1 for the relay's current role: active, standby or starting", "role"
        )
        self.role = "starting"
        self.set_role("starting")
        gauge(
            "cdc_relay_build_info",
            "The relay's version and hot path: compiled or pure-python (always 1)",
            "version",
            "implementation",
        ).labels(slot, __version__, accel.implementation()).set(1)
        self._slot_lag = gauge(
            "cdc_relay_slot_lag_bytes", "Current WAL minus the slot's confirmed_flush_lsn"
        )
        self._slot_retained = gauge(
            "cdc_relay_slot_retained_wal_bytes", "Current WAL minus the slot's restart_lsn"
        )
        self._slot_safe = gauge(
            "cdc_relay_slot_safe_wal_size_bytes",
            "WAL that can still be written before the slot is lost (NaN: unlimited)",
        )
        self._slot_status = gauge(
            "cdc_relay_slot_wal_status",
            "1 for the slot's current wal_status: reserved, extended, unreserved or lost",
            "status",
        )
        self._slot_active = gauge("cdc_relay_slot_active", "1 while some walsender holds the slot")
        self._dead_letters_pending = gauge(
            "cdc_relay_dead_letters_pending", "Dead letters not replayed yet"
        )

    def table(self, name: str) -> TableCounters:
        """The per-row counters of one outbox table (made on first use)."""
        counters = self._tables.get(name) or self._default
        if counters is None:
            counters = self._tables[name] = TableCounters(self.slot, name)
        return counters

    def set_role(self, role: str) -> None:
        """``active`` (streaming), ``standby`` (another relay holds the slot) or ``starting``."""
        self.role = role
        for each in ROLES:
            self._role.labels(self.slot, each).set(1 if each == role else 0)

    def ready_in_role(self) -> bool:
        """/readyz: streaming as the active relay, or standing by as a standby."""
        return self.role == "standby" or (self.role == "active" and bool(self.ready._value.get()))

    def observe_slot(self, status: SlotStatus) -> None:
        """One slot poll (``loops.poll_slot``); what it could not read (no slot) is NaN."""
        slot = self.slot
        nan = float("nan")

        def number(value: int | None) -> float:
            return nan if value is None else float(value)

        primary = status.primary
        self._slot_lag.labels(slot).set(number(primary.lag_bytes if primary else None))
        self._slot_retained.labels(slot).set(
            number(primary.retained_wal_bytes if primary else None)
        )
        self._slot_safe.labels(slot).set(number(primary.safe_wal_size if primary else None))
        wal_status = primary.wal_status if primary is not None else None
        for each in WAL_STATUSES:
            self._slot_status.labels(slot, each).set(1 if each == wal_status else 0)
        self._slot_active.labels(slot).set(1 if primary is not None and primary.active else 0)
        self._dead_letters_pending.labels(slot).set(number(status.dead_letters_pending))

    def confirmed_count(self) -> float:
        return self.confirmed.value

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves /metrics, /healthz (process alive) and /readyz (healthy in its role).

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
            if self.metrics.ready_in_role():
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

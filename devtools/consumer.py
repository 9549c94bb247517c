"""The one AMQP test consumer (aio-pika), for tests, the benchmark and the demo.

``Consumer`` declares the relay's exchange and a durable queue bound to it,
then records every delivery (acking it); subclasses override ``record`` to
keep less per message: ``SeqCounter`` for huge runs, ``ArrivalRecorder`` for
the benchmark's commit-to-delivery latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from devtools.amqp import declare_exchange, queue_depth

__all__ = ["ArrivalRecorder", "Consumer", "Delivery", "SeqCounter"]


@dataclass
class Delivery:
    message_id: str
    body: bytes
    routing_key: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    redelivered: bool
    received_at: float  # time.time() when the consumer saw it


class Consumer:
    """Collects every delivery from a queue bound to the test's exchange."""

    def __init__(
        self,
        amqp_url: str,
        exchange: str | None,
        binding: str = "#",
        queue: str | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.binding = binding
        if queue is None and exchange is None:
            raise ValueError("a Consumer needs an exchange to bind to or an existing queue")
        self.queue_name = queue or f"q_{exchange}"
        self.deliveries: list[Delivery] = []
        self._no_ack = False
        self._prefetch = 2000
        self._declare: dict[str, Any] | None = None  # queue arguments when start() declares it
        self._connection: AbstractConnection | None = None
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self, arguments: dict[str, Any] | None = None) -> Consumer:
        """Declare the exchange and the queue (with ``arguments``), bind, consume with acks."""
        assert self.exchange is not None, "start() binds to an exchange; use attach()"
        await declare_exchange(self.amqp_url, self.exchange)
        self._declare = dict(arguments or {})
        await self._begin()
        return self

    async def attach(self, no_ack: bool = False, prefetch: int = 2000) -> Consumer:
        """Consume a queue that already exists (declared passively), optionally without acks."""
        self._no_ack, self._prefetch = no_ack, prefetch
        await self._begin()
        return self

    async def _begin(self) -> None:
        """Consume now (errors raise here), then keep consuming across broker restarts."""
        closed = await self._consume()
        self._supervisor = asyncio.create_task(self._reconnect_forever(closed))

    async def _consume(self) -> asyncio.Event:
        """One connection consuming the queue; the event fires when it or its channel closes.

        The consumer reconnects by itself instead of using aio-pika's robust
        connection: a test that restarts the broker must not depend on that
        library's channel restore, which once left a consumer silent for good.
        """
        closed = asyncio.Event()
        connection = await aio_pika.connect(self.amqp_url, timeout=10)
        self._connection = connection
        try:
            connection.close_callbacks.add(lambda *_: closed.set())
            channel = await connection.channel()
            channel.close_callbacks.add(lambda *_: closed.set())
            await channel.set_qos(prefetch_count=self._prefetch)
            if self._declare is None:
                queue = await channel.declare_queue(self.queue_name, passive=True)
            else:
                queue = await channel.declare_queue(
                    self.queue_name, durable=True, arguments=self._declare or None
                )
                assert self.exchange is not None
                await queue.bind(self.exchange, self.binding)
            await queue.consume(self._on_message, no_ack=self._no_ack)
        except BaseException:
            await connection.close()
            raise
        return closed

    async def _reconnect_forever(self, closed: asyncio.Event) -> None:
        """After a lost connection, try again every half second until close()."""
        while not self._closing:
            await closed.wait()
            if self._closing:
                return
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
            while not self._closing:
                await asyncio.sleep(0.5)
                try:
                    closed = await self._consume()
                    break
                except Exception:  # the broker is still down or booting
                    continue

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.record(message)
        if not self._no_ack:
            await message.ack()

    def record(self, message: AbstractIncomingMessage) -> None:
        """Keep what the tests look at; subclasses keep less."""
        self.deliveries.append(
            Delivery(
                message_id=message.message_id or "",
                body=message.body,
                routing_key=message.routing_key or "",
                headers=dict(message.headers),
                properties={
                    "content_type": message.content_type,
                    "delivery_mode": int(message.delivery_mode),
                    "type": message.type,
                    "app_id": message.app_id,
                    "timestamp": message.timestamp,
                },
                redelivered=bool(message.redelivered),
                received_at=time.time(),
            )
        )

    def ids(self) -> list[str]:
        return [d.message_id for d in self.deliveries]

    async def wait_for(self, ids: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= set(self.ids()):
                return
            await asyncio.sleep(0.05)
        missing = ids - set(self.ids())
        raise AssertionError(
            f"{len(missing)} of {len(ids)} messages missing after {timeout}s; "
            f"{await self._backlog()}"
        )

    async def _backlog(self) -> str:
        """Tell a stalled consumer (messages waiting in its queue) from a stalled publisher."""
        try:
            ready = await asyncio.wait_for(queue_depth(self.amqp_url, self.queue_name), 15)
        except Exception as exc:  # diagnostics only, the assertion follows
            return f"queue {self.queue_name} depth unknown ({exc!r})"
        return f"{ready} ready in queue {self.queue_name}"

    async def settle(self, quiet: float = 1.0, timeout: float = 30) -> None:
        """Wait until no new delivery arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        count, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.deliveries) != count:
                count, since = len(self.deliveries), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None


class SeqCounter(Consumer):
    """A lean consumer for huge runs: which ``g`` values (body ``{"g": n}``) arrived, how often."""

    def __init__(self, amqp_url: str, queue: str, size: int) -> None:
        super().__init__(amqp_url, None, queue=queue)
        self.seen = bytearray(size + 1)
        self.total = 0

    async def start(self, arguments: dict[str, Any] | None = None) -> SeqCounter:
        await self.attach(no_ack=True, prefetch=5000)
        return self

    def record(self, message: AbstractIncomingMessage) -> None:
        g = orjson.loads(message.body)["g"]
        self.total += 1
        if self.seen[g] < 255:
            self.seen[g] += 1

    def missing(self) -> int:
        return self.seen.count(0) - 1  # index 0 is unused


class ArrivalRecorder(Consumer):
    """No-ack consumer that notes when each message_id arrived (time.time()), nothing else."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        super().__init__(amqp_url, None, queue=queue)
        self.arrivals: list[tuple[str, float]] = []

    def record(self, message: AbstractIncomingMessage) -> None:
        self.arrivals.append((message.message_id or "", time.time()))

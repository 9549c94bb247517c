"""Publish envelopes with publisher confirms; report each one confirmed or failed.

One confirm channel, ``mandatory`` on every publish, persistent messages, and a
bounded window of unconfirmed publishes. Publishes are issued in call order on
that one channel, so the broker sees them in commit order. The outcome of each
publish goes to the callbacks; the publisher itself never retries, because a
lost confirm means "unknown" and only the slot can replay safely.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from cdc_relay.router import Envelope

log = logging.getLogger(__name__)


class PublishFailed(Exception):
    """The broker did not take a message: nack, return, or lost channel/connection."""

    def __init__(self, reason: str, *, returned: bool = False, reply_code: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.returned = returned
        self.reply_code = reply_code


OnConfirm = Callable[[int], None]
OnFailure = Callable[[int, Envelope, PublishFailed], None]


def amqp_properties(envelope: Envelope) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        headers=envelope.headers,
        delivery_mode=envelope.delivery_mode,
        correlation_id=envelope.correlation_id,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        message_type=envelope.type,
        app_id=envelope.app_id,
    )


class Publisher:
    """A confirm-mode publishing channel with a bounded in-flight window."""

    def __init__(
        self,
        urls: list[str],
        *,
        max_in_flight: int = 1000,
        confirm_timeout: float = 30.0,
        heartbeat: int = 10,
        on_confirm: OnConfirm,
        on_failure: OnFailure,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._urls = urls
        self._max_in_flight = max_in_flight
        self._confirm_timeout = confirm_timeout
        self._heartbeat = heartbeat
        self._on_confirm = on_confirm
        self._on_failure = on_failure
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._in_flight = 0
        self._window_open: asyncio.Event = asyncio.Event()
        self._window_open.set()
        self._all_done: asyncio.Event = asyncio.Event()
        self._all_done.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connected_url: str | None = None

    async def connect(self) -> None:
        """Connect to the first reachable node (in random order for clusters)."""
        urls = list(self._urls)
        random.shuffle(urls)
        errors: list[str] = []
        for url in urls:
            try:
                connection = await aio_pika.connect(
                    url,
                    timeout=10,
                    client_properties={"connection_name": "cdc-relay"},
                    heartbeat=self._heartbeat,
                )
            except Exception as exc:
                errors.append(f"{_redact(url)}: {exc!r}")
                continue
            self._connection = connection
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            self._channel = await channel.get_underlay_channel()
            self.connected_url = _redact(url)
            return
        raise ConnectionError("cannot connect to RabbitMQ: " + "; ".join(errors))

    @property
    def connection(self) -> aio_pika.abc.AbstractConnection:
        if self._connection is None:
            raise RuntimeError("publisher is not connected")
        return self._connection

    async def declare_exchange(self, name: str, kind: str = "topic") -> None:
        channel = await self.connection.channel()
        try:
            await channel.declare_exchange(name, kind, durable=True)
        finally:
            await channel.close()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def publish(self, seq: int, envelope: Envelope) -> None:
        """Send one message; returns once it is on its way (the window had room)."""
        while self._in_flight >= self._max_in_flight:
            self._window_open.clear()
            await self._window_open.wait()
        channel = self._channel
        if channel is None or channel.is_closed:
            raise PublishFailed("channel is closed")
        self._in_flight += 1
        self._all_done.clear()
        task = asyncio.ensure_future(
            channel.basic_publish(
                envelope.body,
                exchange=envelope.exchange,
                routing_key=envelope.routing_key,
                properties=amqp_properties(envelope),
                mandatory=True,
                timeout=self._confirm_timeout,
            )
        )
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, seq, envelope))

    def _done(self, task: asyncio.Task[Any], seq: int, envelope: Envelope) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._in_flight < self._max_in_flight:
            self._window_open.set()
        if self._in_flight == 0:
            self._all_done.set()
        if task.cancelled():
            self._on_failure(seq, envelope, PublishFailed("publish cancelled"))
            return
        exc = task.exception()
        if exc is not None:
            frame = getattr(exc, "frame", None)
            if isinstance(frame, spec.Basic.Nack):
                self._on_failure(seq, envelope, PublishFailed("nacked by broker"))
                return
            if isinstance(exc, TimeoutError):
                reason = f"no confirm within {self._confirm_timeout}s"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            self._on_failure(seq, envelope, PublishFailed(reason))
            return
        result = task.result()
        if isinstance(result, spec.Basic.Ack):
            self._on_confirm(seq)
        elif isinstance(result, DeliveredMessage):
            frame = result.delivery
            code = getattr(frame, "reply_code", None)
            text = getattr(frame, "reply_text", "returned")
            self._on_failure(
                seq,
                envelope,
                PublishFailed(
                    f"returned by broker: {code} {text} (exchange {envelope.exchange!r}, "
                    f"routing key {envelope.routing_key!r})",
                    returned=True,
                    reply_code=code,
                ),
            )
        elif isinstance(result, spec.Basic.Nack):
            self._on_failure(seq, envelope, PublishFailed("nacked by broker"))
        else:
            self._on_failure(seq, envelope, PublishFailed(f"unexpected confirm {result!r}"))

    async def wait_confirmed(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if the timeout ran out first."""
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), 5)
            except Exception as exc:
                log.debug("closing AMQP connection: %r", exc)
        self._connection = None
        self._channel = None


def _redact(url: str) -> str:
    """Hide the password in a URL before it reaches a log line."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"

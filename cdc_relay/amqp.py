"""Publish envelopes with publisher confirms; report each one confirmed or failed.

One connection, one confirm channel, ``mandatory`` on every publish, and a
bounded window of unconfirmed publishes. Publishes go out in call order on that
one channel, so the broker sees them in commit order. Each outcome goes to a
callback; the publisher never retries, because a lost confirm means "unknown"
and only the slot can replay safely.

The publishing connection speaks AMQP itself (handshake and control frames via
pamqp, publish frames from ``amqp_wire``): aio-pika's per-message futures and
frame objects cost more CPU than everything else in the relay together (see
docs/performance.md). aio-pika is still used for topology (declarations).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.base import Frame
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from cdc_relay import __version__
from cdc_relay.amqp_wire import PublishEncoder
from cdc_relay.router import Envelope

log = logging.getLogger(__name__)

CHANNEL = 1
FRAME_MAX = 131072
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"


class PublishFailed(Exception):
    """The broker did not take a message: nack, return, or lost channel/connection."""

    def __init__(self, reason: str, *, returned: bool = False, reply_code: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.returned = returned
        self.reply_code = reply_code


OnConfirm = Callable[[list[int]], None]  # the sequence numbers one ack frame confirmed
OnFailure = Callable[[int, Envelope, PublishFailed], None]


@dataclass(slots=True)
class _InFlight:
    tag: int
    seq: int
    envelope: Envelope
    sent_at: float
    done: bool = False
    returned: PublishFailed | None = None


@dataclass(slots=True)
class AmqpAddress:
    host: str
    port: int
    user: str
    password: str
    vhost: str

    @classmethod
    def parse(cls, url: str) -> AmqpAddress:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "amqp":
            raise ValueError(f"unsupported AMQP URL scheme {parts.scheme!r} (use amqp://)")
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 5672,
            user=urllib.parse.unquote(parts.username or "guest"),
            password=urllib.parse.unquote(parts.password or "guest"),
            vhost=vhost,
        )


class _Protocol(asyncio.Protocol):
    """Frames in, frames out; hands every incoming frame to the publisher."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        publisher = self.publisher
        publisher.last_received = time.monotonic()
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 8:
            size = int.from_bytes(buffer[3:7], "big")
            end = size + 8
            if len(buffer) < end:
                break
            raw = bytes(buffer[:end])
            del buffer[:end]
            try:
                _, channel, value = pamqp_frame.unmarshal(raw)
            except UnmarshalingException as exc:
                publisher.connection_failed(PublishFailed(f"bad frame from broker: {exc}"))
                return
            publisher.frame_received(channel, value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.publisher.connection_failed(
            PublishFailed(f"AMQP connection lost: {exc!r}" if exc else "AMQP connection closed")
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
        self.on_connection_lost: Callable[[PublishFailed], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._protocol: _Protocol | None = None
        self._encoder = PublishEncoder(CHANNEL, FRAME_MAX)
        self._order: deque[_InFlight] = deque()
        self._by_tag: dict[int, _InFlight] = {}
        self._next_tag = 1
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._expect: tuple[type, asyncio.Future[Any]] | None = None
        self._returning: tuple[spec.Basic.Return, ContentHeader | None] | None = None
        self._failed: PublishFailed | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.blocked = False
        self.last_received = time.monotonic()
        self.connected_url: str | None = None

    # -- connection ------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the first reachable node (in random order for clusters)."""
        urls = list(self._urls)
        random.shuffle(urls)
        errors: list[str] = []
        for url in urls:
            try:
                await asyncio.wait_for(self._open(AmqpAddress.parse(url)), 15)
            except (OSError, TimeoutError, PublishFailed, ValueError) as exc:
                errors.append(f"{redact(url)}: {exc}")
                self._abort()
                self._failed = None
                continue
            self.connected_url = redact(url)
            return
        raise ConnectionError("cannot connect to RabbitMQ: " + "; ".join(errors))

    async def _open(self, address: AmqpAddress) -> None:
        _, protocol = await self._loop.create_connection(
            lambda: _Protocol(self), address.host, address.port
        )
        self._protocol = protocol
        assert protocol.transport is not None
        protocol.transport.write(b"AMQP\x00\x00\x09\x01")
        await self._wait_for(spec.Connection.Start)
        self._send_method(
            0,
            spec.Connection.StartOk(
                client_properties={
                    "product": "cdc-relay",
                    "version": __version__,
                    "connection_name": "cdc-relay",
                    "capabilities": {
                        "publisher_confirms": True,
                        "basic.nack": True,
                        "connection.blocked": True,
                        "authentication_failure_close": True,
                    },
                },
                mechanism="PLAIN",
                response=f"\0{address.user}\0{address.password}",
                locale="en_US",
            ),
        )
        tune = await self._wait_for(spec.Connection.Tune)
        frame_max = min(tune.frame_max or FRAME_MAX, FRAME_MAX)
        heartbeat = self._heartbeat if not tune.heartbeat else min(tune.heartbeat, self._heartbeat)
        if not self._heartbeat:
            heartbeat = 0
        self._heartbeat = heartbeat
        self._encoder = PublishEncoder(CHANNEL, frame_max)
        self._send_method(
            0,
            spec.Connection.TuneOk(
                channel_max=tune.channel_max or 2047, frame_max=frame_max, heartbeat=heartbeat
            ),
        )
        self._send_method(0, spec.Connection.Open(virtual_host=address.vhost))
        await self._wait_for(spec.Connection.OpenOk)
        self._send_method(CHANNEL, spec.Channel.Open())
        await self._wait_for(spec.Channel.OpenOk)
        self._send_method(CHANNEL, spec.Confirm.Select())
        await self._wait_for(spec.Confirm.SelectOk)
        self._watchdog = asyncio.create_task(self._watch(), name="cdc-relay-amqp-watchdog")

    def _send_method(self, channel: int, method: Frame) -> None:
        assert self._protocol is not None and self._protocol.transport is not None
        self._protocol.transport.write(pamqp_frame.marshal(method, channel))

    async def _wait_for(self, kind: type) -> Any:
        if self._failed is not None:
            raise self._failed
        future: asyncio.Future[Any] = self._loop.create_future()
        self._expect = (kind, future)
        try:
            return await future
        finally:
            self._expect = None

    async def _watch(self) -> None:
        """Heartbeats both ways, and the confirm timeout, checked twice a second."""
        last_sent = 0.0
        while self._failed is None:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self._heartbeat:
                if now - last_sent >= self._heartbeat / 2:
                    self._write_now(HEARTBEAT_FRAME)
                    last_sent = now
                if now - self.last_received > 2 * self._heartbeat:
                    self.connection_failed(
                        PublishFailed(f"no data from RabbitMQ for {now - self.last_received:.1f}s")
                    )
                    return
            if self._order and now - self._order[0].sent_at > self._confirm_timeout:
                self.connection_failed(
                    PublishFailed(
                        f"no confirm within {self._confirm_timeout}s"
                        + (" (connection blocked by a broker alarm)" if self.blocked else "")
                    )
                )
                return

    # -- incoming frames -------------------------------------------------------------

    def frame_received(self, channel: int, value: Any) -> None:
        kind = type(value)
        if kind is spec.Basic.Ack:
            self._settle(value.delivery_tag, value.multiple, None)
        elif kind is spec.Basic.Nack:
            self._settle(value.delivery_tag, value.multiple, PublishFailed("nacked by broker"))
        elif kind is spec.Basic.Return:
            self._returning = (value, None)
        elif kind is ContentHeader and self._returning is not None:
            self._returning = (self._returning[0], value)
            if value.body_size == 0:
                self._returned()
        elif self._returning is not None and kind.__name__ == "ContentBody":
            self._returned()  # bodies of returned messages are not needed
        elif kind is Heartbeat:
            pass
        elif kind is spec.Connection.Blocked:
            self.blocked = True
            log.warning("RabbitMQ blocked the connection: %s", value.reason)
        elif kind is spec.Connection.Unblocked:
            self.blocked = False
            log.info("RabbitMQ unblocked the connection")
        elif kind is spec.Channel.Close:
            self._send_method(CHANNEL, spec.Channel.CloseOk())
            self.connection_failed(
                PublishFailed(f"channel closed by broker: {value.reply_code} {value.reply_text}")
            )
        elif kind is spec.Connection.Close:
            with contextlib.suppress(Exception):
                self._send_method(0, spec.Connection.CloseOk())
            self.connection_failed(
                PublishFailed(f"connection closed by broker: {value.reply_code} {value.reply_text}")
            )
        elif self._expect is not None and isinstance(value, self._expect[0]):
            if not self._expect[1].done():
                self._expect[1].set_result(value)
        else:
            log.debug("ignoring AMQP frame %r on channel %d", value, channel)

    def _returned(self) -> None:
        assert self._returning is not None
        frame, header = self._returning
        self._returning = None
        message_id = header.properties.message_id if header is not None else None
        error = PublishFailed(
            f"returned by broker: {frame.reply_code} {frame.reply_text} "
            f"(exchange {frame.exchange!r}, routing key {frame.routing_key!r})",
            returned=True,
            reply_code=frame.reply_code,
        )
        # The return precedes the ack of the same message: the oldest unsettled
        # publish with that id is the one.
        for entry in self._order:
            if (
                not entry.done
                and entry.returned is None
                and entry.envelope.message_id == message_id
            ):
                entry.returned = error
                return
        log.warning("unmatched basic.return for message %s", message_id)

    def _settle(self, tag: int, multiple: bool, error: PublishFailed | None) -> None:
        """One ack/nack frame: confirmed messages are reported together, in order."""
        order = self._order
        by_tag = self._by_tag
        confirmed: list[int] = []
        if multiple:
            while order and order[0].tag <= tag:
                entry = order.popleft()
                if not entry.done:
                    self._report(entry, error, confirmed)
        else:
            entry = by_tag.get(tag)
            if entry is None or entry.done:
                return
            self._report(entry, error, confirmed)
            while order and order[0].done:
                order.popleft()
        if len(by_tag) < self._max_in_flight:
            self._window_open.set()
        if not by_tag:
            self._all_done.set()
        if confirmed:
            self._on_confirm(confirmed)

    def _report(self, entry: _InFlight, error: PublishFailed | None, confirmed: list[int]) -> None:
        entry.done = True
        del self._by_tag[entry.tag]
        if error is None and entry.returned is None:
            confirmed.append(entry.seq)
        else:
            self._on_failure(entry.seq, entry.envelope, entry.returned or error)  # type: ignore[arg-type]

    def connection_failed(self, error: PublishFailed) -> None:
        if self._failed is not None:
            return
        self._failed = error
        if self._expect is not None and not self._expect[1].done():
            self._expect[1].set_exception(error)
        pending = [e for e in self._order if not e.done]
        self._order.clear()
        self._by_tag.clear()
        for entry in pending:
            entry.done = True
            self._on_failure(entry.seq, entry.envelope, error)
        self._window_open.set()
        self._all_done.set()
        if self.on_connection_lost is not None:
            self.on_connection_lost(error)
        self._abort()

    # -- publishing ----------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._by_tag)

    async def publish(self, seq: int, envelope: Envelope) -> None:
        """Queue one message; returns once it is on its way (the window had room)."""
        while len(self._by_tag) >= self._max_in_flight and self._failed is None:
            self._window_open.clear()
            self._flush_out()
            await self._window_open.wait()
        if self._failed is not None:
            raise self._failed
        data = self._encoder.encode(envelope)
        tag = self._next_tag
        self._next_tag = tag + 1
        entry = _InFlight(tag, seq, envelope, time.monotonic())
        self._order.append(entry)
        self._by_tag[tag] = entry
        self._all_done.clear()
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Write everything queued since the last flush in one go."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self._write_now(data)

    def _write_now(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            return
        protocol.transport.write(data)

    async def wait_confirmed(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if the timeout ran out first."""
        self._flush_out()
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _abort(self) -> None:
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    async def close(self) -> None:
        """Close politely if we can; our own close is not reported as a failure."""
        self.on_connection_lost = None
        if self._failed is None and self._protocol is not None:
            self._failed = PublishFailed("publisher closed")
            with contextlib.suppress(Exception):
                self._send_method(
                    0, spec.Connection.Close(reply_code=200, reply_text="cdc-relay closing")
                )
            await asyncio.sleep(0)
        self._abort()


async def declare_exchange(url: str, name: str, kind: str = "topic") -> None:
    """Topology goes through aio-pika: it is not on the hot path."""
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(name, kind, durable=True)


def redact(url: str) -> str:
    """Hide the password in a URL before it reaches a log line."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"

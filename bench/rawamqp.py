"""A minimal asyncio AMQP 0-9-1 client on pamqp, for measuring (not for production).

Two jobs only, where aio-pika cannot keep up (measured on this 2-core machine,
50,000 persistent 300-byte messages, two runs each, the machine shared):

- the broker ceiling: write pre-marshalled publish frames in bulk on a confirm
  channel and count the acks (``multiple`` ones included): 4,500-6,700 msg/s
  at 0.5 µs client CPU per message; aio-pika publishing with confirms (window
  2,000) reached 1,850-2,100 msg/s at 260-270 µs, below cdc-relay itself, so
  it would not be a ceiling;
- the latency runs' no-ack consumer that records when each message_id
  arrived: 14,000-18,700 msg/s at 5-8 µs; aio-pika (``devtools.consumer.
  ArrivalRecorder``) 4,100-5,200 msg/s at 130-140 µs, under the 5,000 rows/s
  latency step, so its own queueing would be measured as relay latency.

Topology (exchange, queue, bindings, counts) goes through ``devtools.amqp`` on
aio-pika like everywhere else. It has no heartbeats (negotiated off), no
recovery and no flow control beyond TCP: a failure raises and ends the
measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

CHANNEL = 1
FRAME_MAX = 131072
_HEAD = struct.Struct("!BHI")
_METHOD_ID = struct.Struct("!HH")
_MESSAGE_ID_BIT = 1 << 7


class AmqpError(Exception):
    """The broker closed the channel or connection, nacked, or the socket died."""


def publish_frames(
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: spec.Basic.Properties,
    channel: int = CHANNEL,
    mandatory: bool = False,
) -> bytes:
    """basic.publish + content header + body, marshalled by pamqp (body < frame_max)."""
    return b"".join(
        (
            pamqp_frame.marshal(
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
                channel,
            ),
            pamqp_frame.marshal(ContentHeader(0, len(body), properties), channel),
            pamqp_frame.marshal(ContentBody(body), channel),
        )
    )


def message_id_of_header(payload: memoryview) -> str | None:
    """The message_id property of a content-header frame payload, parsed by hand.

    Layout: class(2) weight(2) body size(8) flags(2), then the properties in
    flag order; message_id follows content-type, content-encoding, headers,
    delivery-mode, priority, correlation-id, reply-to and expiration.
    """
    flags = int.from_bytes(payload[12:14], "big")
    if not flags & _MESSAGE_ID_BIT:
        return None
    pos = 14
    for bit in range(15, 7, -1):
        if not flags & (1 << bit):
            continue
        if bit == 13:  # headers: a long-prefixed table
            pos += 4 + int.from_bytes(payload[pos : pos + 4], "big")
        elif bit in (12, 11):  # delivery-mode, priority: one octet
            pos += 1
        else:  # short strings
            pos += 1 + payload[pos]
    size = payload[pos]
    return bytes(payload[pos + 1 : pos + 1 + size]).decode()


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RawAmqp) -> None:
        self.client = client
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(AmqpError(f"connection lost: {exc!r}" if exc else "connection closed"))


class RawAmqp:
    """One connection, one channel; RPCs are sequential, publishes and deliveries are streams."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.error: AmqpError | None = None
        self._expect: tuple[type, asyncio.Future[Any]] | None = None
        self._loop = asyncio.get_running_loop()
        # confirm tracking
        self.confirm_mode = False
        self.confirmed_upto = 0
        self.confirmed_singles: set[int] = set()
        self.nacks = 0
        self.on_ack: Callable[[], None] | None = None
        # per-publish confirm times (time.time(), by delivery tag) while publish_paced runs
        self.ack_times: list[float] | None = None
        self._timed_upto = 0
        # consuming
        self.on_message_id: Callable[[str, float], None] | None = None

    # -- connection -------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str) -> RawAmqp:
        parts = urllib.parse.urlsplit(url)
        client = cls()
        await client._loop.create_connection(
            lambda: _Protocol(client), parts.hostname or "127.0.0.1", parts.port or 5672
        )
        assert client.transport is not None
        client.transport.write(b"AMQP\x00\x00\x09\x01")
        await client._wait(spec.Connection.Start)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        client.send(
            spec.Connection.StartOk(
                client_properties={"product": "cdc-relay-bench"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
            0,
        )
        tune = await client._wait(spec.Connection.Tune)
        client.send(
            spec.Connection.TuneOk(
                channel_max=tune.channel_max or 2047,
                frame_max=min(tune.frame_max or FRAME_MAX, FRAME_MAX),
                heartbeat=0,
            ),
            0,
        )
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        await client.rpc(spec.Connection.Open(virtual_host=vhost), spec.Connection.OpenOk, 0)
        await client.rpc(spec.Channel.Open(), spec.Channel.OpenOk)
        return client

    async def close(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.error is None:
            with contextlib.suppress(AmqpError, TimeoutError):
                await asyncio.wait_for(
                    self.rpc(
                        spec.Connection.Close(
                            reply_code=200, reply_text="bye", class_id=0, method_id=0
                        ),
                        spec.Connection.CloseOk,
                        0,
                    ),
                    5,
                )
        self.transport.close()

    def send(self, method: Any, channel: int = CHANNEL) -> None:
        assert self.transport is not None
        self.transport.write(pamqp_frame.marshal(method, channel))

    async def rpc(self, method: Any, reply: type, channel: int = CHANNEL) -> Any:
        self.send(method, channel)
        return await self._wait(reply)

    async def _wait(self, kind: type) -> Any:
        if self.error is not None:
            raise self.error
        future: asyncio.Future[Any] = self._loop.create_future()
        self._expect = (kind, future)
        try:
            return await future
        finally:
            self._expect = None

    def lost(self, error: AmqpError) -> None:
        if self.error is None:
            self.error = error
        if self._expect is not None and not self._expect[1].done():
            self._expect[1].set_exception(self.error)
        if self.on_ack is not None:
            self.on_ack()

    # -- incoming frames ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer
        buffer += data
        view = memoryview(buffer)
        pos = 0
        end = len(buffer)
        try:
            while end - pos >= 8:
                kind, _channel, size = _HEAD.unpack_from(view, pos)
                stop = pos + 8 + size
                if stop > end:
                    break
                if kind == 2 and self.on_message_id is not None:
                    message_id = message_id_of_header(view[pos + 7 : stop - 1])
                    if message_id is not None:
                        self.on_message_id(message_id, now)
                elif kind == 1:
                    self._method_frame(view, pos, stop)
                pos = stop
        finally:
            view.release()
        del buffer[:pos]

    def _method_frame(self, view: memoryview, pos: int, stop: int) -> None:
        """Acks, nacks and deliveries by hand (the hot ones), the rest through pamqp."""
        class_id, method_id = _METHOD_ID.unpack_from(view, pos + 7)
        if class_id == 60:
            if method_id == 60:  # basic.deliver: the content header carries the id
                return
            if method_id in (80, 120):  # basic.ack, basic.nack
                tag = int.from_bytes(view[pos + 11 : pos + 19], "big")
                if method_id == 120:
                    self.nacks += 1
                multiple = bool(view[pos + 19] & 1)
                if self.ack_times is not None:
                    self._time_ack(tag, multiple, time.time())
                self._settle(tag, multiple)
                return
        _, _, value = pamqp_frame.unmarshal(bytes(view[pos:stop]))
        self._method(value)

    def _method(self, value: Any) -> None:
        kind = type(value)
        if kind is spec.Channel.Close or kind is spec.Connection.Close:
            reply = spec.Channel.CloseOk() if kind is spec.Channel.Close else None
            if reply is not None:
                self.send(reply)
            self.lost(AmqpError(f"closed by broker: {value.reply_code} {value.reply_text}"))
        elif (
            self._expect is not None
            and isinstance(value, self._expect[0])
            and not self._expect[1].done()
        ):
            self._expect[1].set_result(value)

    def _settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            if tag > self.confirmed_upto:
                self.confirmed_upto = tag
                self.confirmed_singles = {t for t in self.confirmed_singles if t > tag}
        elif tag > self.confirmed_upto:
            self.confirmed_singles.add(tag)
        singles = self.confirmed_singles
        while self.confirmed_upto + 1 in singles:
            self.confirmed_upto += 1
            singles.discard(self.confirmed_upto)
        if self.on_ack is not None:
            self.on_ack()

    def _time_ack(self, tag: int, multiple: bool, now: float) -> None:
        times = self.ack_times
        assert times is not None
        if tag >= len(times):
            return
        if multiple:
            for t in range(self._timed_upto + 1, tag + 1):
                if not times[t]:
                    times[t] = now
            self._timed_upto = max(self._timed_upto, tag)
        elif not times[tag]:
            times[tag] = now

    @property
    def confirmed(self) -> int:
        """How many publishes were settled (acked or nacked) so far."""
        return self.confirmed_upto + len(self.confirmed_singles)

    # -- publishing -----------------------------------------------------------------

    async def publish_bulk(self, frames: bytes, count: int, window: int, timeout: float) -> float:
        """Publish ``count`` copies of ``frames`` with confirms; seconds until the last ack.

        Writes happen from the ack callback, so the window refills as soon as
        acks arrive, without a polling loop.
        """
        if not self.confirm_mode:
            await self.rpc(spec.Confirm.Select(), spec.Confirm.SelectOk)
            self.confirm_mode = True
        assert self.transport is not None
        transport = self.transport
        base = self.confirmed
        sent = 0
        done = self._loop.create_future()

        def refill() -> None:
            nonlocal sent
            if self.error is not None:
                if not done.done():
                    done.set_exception(self.error)
                return
            acked = self.confirmed - base
            room = min(window - (sent - acked), count - sent)
            if room >= min(64, count - sent) and room > 0:
                transport.write(frames * room)
                sent += room
            if acked >= count and not done.done():
                done.set_result(None)

        started = time.monotonic()
        self.on_ack = refill
        try:
            refill()
            await asyncio.wait_for(done, timeout)
        finally:
            self.on_ack = None
        if self.nacks:
            raise AmqpError(f"{self.nacks} publish(es) nacked")
        return time.monotonic() - started

    async def publish_paced(
        self, frames: bytes, rate: float, seconds: float, tick: float = 0.0005
    ) -> list[float]:
        """Publish one copy of ``frames`` per 1/``rate`` s for ``seconds``; publish->confirm each.

        Each wake-up (about every ``tick``) writes the messages that fell due
        since the last one, in one write, and stamps them with the write time;
        confirms are stamped on arrival (``multiple`` ones expanded). Returns
        the seconds from write to confirm per message; waits at most 30 s for
        the last confirms.
        """
        if not self.confirm_mode:
            await self.rpc(spec.Confirm.Select(), spec.Confirm.SelectOk)
            self.confirm_mode = True
        assert self.transport is not None
        total = int(rate * seconds)
        base = self.confirmed
        sent_at = [0.0] * (base + total + 1)
        self.ack_times = [0.0] * (base + total + 1)
        self._timed_upto = base
        sent = 0
        started = time.monotonic()
        try:
            while sent < total:
                due = min(total, int((time.monotonic() - started) * rate) + 1)
                if due > sent:
                    now = time.time()
                    self.transport.write(frames * (due - sent))
                    for tag in range(base + sent + 1, base + due + 1):
                        sent_at[tag] = now
                    sent = due
                if self.error is not None:
                    raise self.error
                await asyncio.sleep(tick)
            deadline = time.monotonic() + 30
            while self.confirmed - base < total and time.monotonic() < deadline:
                if self.error is not None:
                    raise self.error
                await asyncio.sleep(0.01)
            acks = self.ack_times
        finally:
            self.ack_times = None
        if self.nacks:
            raise AmqpError(f"{self.nacks} publish(es) nacked")
        if self.confirmed - base < total:
            raise AmqpError(f"only {self.confirmed - base} of {total} publishes confirmed in 30 s")
        return [acks[t] - sent_at[t] for t in range(base + 1, base + total + 1)]

    # -- consuming ------------------------------------------------------------------

    async def consume_no_ack(self, queue: str, on_message_id: Callable[[str, float], None]) -> None:
        """Deliveries call ``on_message_id(message_id, arrival_unix_time)``."""
        self.on_message_id = on_message_id
        await self.rpc(spec.Basic.Consume(queue=queue, no_ack=True), spec.Basic.ConsumeOk)

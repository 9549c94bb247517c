"""One AMQP 0-9-1 connection attempt over asyncio: framing, handshake, heartbeats, closes.

Each attempt is its own object and the transport's protocol, so a stale
transport (a node that timed out, an old session) can only ever call back
into its own, abandoned object: it cannot fail a newer connection. Failures
before ``open`` returns are raised from ``open``; after that they go to
``on_lost`` exactly once, and never for our own ``close``.

Incoming frames are decoded by ``amqp.incoming`` (a confirm channel's acks,
returns and content) or pamqp (the rest) and dispatched by type through a
table; what the connection does not handle itself (connection-level control,
replies to a pending RPC) goes to the single ``on_frame`` callback. Publishing
writes pre-encoded bytes with ``write``; ``paused`` follows the transport's
flow control so the publisher can stop queueing while the socket is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.base import Frame
from pamqp.exceptions import UnmarshalingException
from pamqp.heartbeat import Heartbeat

from cdc_relay import __version__, reasons
from cdc_relay.amqp import incoming
from cdc_relay.amqp.address import AmqpAddress
from cdc_relay.amqp.replies import close_error
from cdc_relay.amqp.window import PublishFailed
from cdc_relay.errors import SessionError

log = logging.getLogger(__name__)

FRAME_MAX = 131072
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_FRAME_HEAD = struct.Struct("!BHI")  # type, channel, payload size

OnFrame = Callable[[int, Any], None]
OnLost = Callable[[PublishFailed], None]


class ConnectError(SessionError, ConnectionError):
    """No node could be connected to; the message names each URL (redacted) and why."""

    # Every node's certificate was rejected (wrong CA or host name): retrying cannot help.
    certificate_rejected: bool = False


class Connection(asyncio.Protocol):
    """A connection attempt; usable once ``open`` has returned it."""

    def __init__(self, on_frame: OnFrame | None, on_lost: OnLost | None, heartbeat: int) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._rpc: dict[int, tuple[tuple[type, ...], asyncio.Future[Any]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._last_received = time.monotonic()
        self.heartbeat = heartbeat
        self.frame_max = FRAME_MAX
        self.channel_max = 2047
        self.server_properties: dict[str, Any] = {}
        self.opened = False
        self.closing = False
        self.error: PublishFailed | None = None
        self.blocked = False
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()

    # -- opening ---------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        address: AmqpAddress,
        *,
        on_frame: OnFrame | None = None,
        on_lost: OnLost | None = None,
        heartbeat: int = 10,
        timeout: float = 10.0,
    ) -> Connection:
        """Connect and complete the handshake within ``timeout`` seconds, or raise."""
        loop = asyncio.get_running_loop()
        connection = cls(on_frame, on_lost, heartbeat)
        context = address.ssl_context()
        if context is not None and not address.verify:
            log.warning(
                "TLS to %s:%d WITHOUT certificate verification (verify=verify_none): "
                "anyone on the path can read and change messages",
                address.host,
                address.port,
            )
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: connection,
                    address.host,
                    address.port,
                    ssl=context,
                    server_hostname=address.tls_server_name,
                )
                await connection._handshake(address)
        except BaseException as exc:
            connection.abort()
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"no AMQP handshake within {timeout:g}s") from None
            raise
        connection.opened = True
        return connection

    async def _handshake(self, address: AmqpAddress) -> None:
        assert self.transport is not None
        self.transport.write(PROTOCOL_HEADER)
        start = await self._expect(0, spec.Connection.Start)
        self.server_properties = dict(start.server_properties or {})
        mechanism = address.auth_mechanism
        offered = _text(start.mechanisms).split()
        if mechanism not in offered:
            hint = (
                " (enable the rabbitmq_auth_mechanism_ssl plugin)"
                if mechanism == "EXTERNAL"
                else ""
            )
            raise PublishFailed(
                f"RabbitMQ does not offer the {mechanism} mechanism{hint}; it offers "
                f"{' '.join(offered) or 'none'}"
            )
        self.send(
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
                mechanism=mechanism,
                response="" if mechanism == "EXTERNAL" else f"\0{address.user}\0{address.password}",
                locale="en_US",
            ),
        )
        tune = await self._expect(0, spec.Connection.Tune)
        self.frame_max = min(tune.frame_max or FRAME_MAX, FRAME_MAX)
        self.channel_max = tune.channel_max or 2047
        if self.heartbeat and tune.heartbeat:
            self.heartbeat = min(tune.heartbeat, self.heartbeat)
        self.send(
            0,
            spec.Connection.TuneOk(
                channel_max=self.channel_max, frame_max=self.frame_max, heartbeat=self.heartbeat
            ),
        )
        if self.heartbeat:
            self._timer = self._loop.call_later(self.heartbeat / 2, self._tick)
        await self.rpc(0, spec.Connection.Open(virtual_host=address.vhost), spec.Connection.OpenOk)

    # -- requests ----------------------------------------------------------------

    def send(self, channel: int, method: Frame) -> None:
        self.write(pamqp_frame.marshal(method, channel))

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def rpc(self, channel: int, method: Frame, *replies: type) -> Any:
        """Send a synchronous method and wait for one of its replies on that channel.

        A channel.close for that channel raises its PublishFailed instead.
        """
        self.send(channel, method)
        return await self._expect(channel, *replies)

    async def _expect(self, channel: int, *replies: type) -> Any:
        if self.error is not None:
            raise self.error
        if channel in self._rpc:
            raise RuntimeError(f"an RPC is already pending on channel {channel}")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._rpc[channel] = (replies, future)
        try:
            return await future
        finally:
            self._rpc.pop(channel, None)

    async def open_channel(self, channel: int) -> None:
        await self.rpc(channel, spec.Channel.Open(), spec.Channel.OpenOk)

    async def wait_writable(self) -> None:
        """Return once the transport takes data again (immediately unless paused)."""
        await self._resumed.wait()

    # -- closing -----------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Close politely (bounded); never reported to ``on_lost``."""
        if self.closing:
            return
        self.closing = True
        if self.error is None and self.transport is not None:
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.rpc(
                        0,
                        spec.Connection.Close(reply_code=200, reply_text="cdc-relay closing"),
                        spec.Connection.CloseOk,
                    )
        self.abort()

    def abort(self) -> None:
        """Drop the socket at once; what follows is not reported as a failure."""
        self.closing = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()
        self._fail(PublishFailed("AMQP connection closed by cdc-relay"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: PublishFailed) -> None:
        """The connection is unusable: fail pending RPCs, report once (unless we closed it)."""
        if self.error is not None:
            return
        self.error = error
        self._stop_timer()
        self._resumed.set()  # writers waiting on flow control must see the failure
        for _, future in self._rpc.values():
            if not future.done():
                future.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        if self.opened and not self.closing and self._on_lost is not None:
            self._on_lost(error)

    def _tick(self) -> None:
        """Heartbeats both ways, checked every half interval."""
        now = time.monotonic()
        silent = now - self._last_received
        if silent > 2 * self.heartbeat:
            self._fail(PublishFailed(f"no data from RabbitMQ for {silent:.1f}s"))
            return
        self.write(HEARTBEAT_FRAME)
        self._timer = self._loop.call_later(self.heartbeat / 2, self._tick)

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]  # (the comment above)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            PublishFailed(f"AMQP connection lost: {exc!r}" if exc else "AMQP connection closed")
        )

    def pause_writing(self) -> None:
        self.paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self._resumed.set()

    def data_received(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        pos = 0
        handlers = _HANDLERS
        head = _FRAME_HEAD.unpack_from
        while size - pos >= 8 and self.error is None:
            kind, channel, length = head(buffer, pos)
            end = pos + 8 + length
            if end > size:
                break
            # The confirm channel's own frames (acks, returns, content) are decoded by
            # hand (amqp.incoming); anything else by pamqp.
            try:
                if buffer[end - 1] != 0xCE:
                    raise incoming.FrameError("frame does not end with 0xCE")
                value: Any = incoming.decode(kind, buffer, pos + 7, end - 1)
                if value is None:
                    _, channel, value = pamqp_frame.unmarshal(bytes(buffer[pos:end]))
            except (UnmarshalingException, ValueError, struct.error, IndexError) as exc:
                self._fail(
                    PublishFailed(f"bad frame from broker: {exc}", code=reasons.PROTOCOL_ERROR)
                )
                return
            pos = end
            handler = handlers.get(type(value))
            if handler is not None:
                handler(self, channel, value)
            else:
                self._deliver(channel, value)
        del buffer[:pos]

    # -- frame handlers ----------------------------------------------------------

    def _deliver(self, channel: int, value: Any) -> None:
        """A reply to a pending RPC resolves it; anything else goes to ``on_frame``."""
        pending = self._rpc.get(channel) if self._rpc else None
        if pending is not None and isinstance(value, pending[0]):
            if not pending[1].done():
                pending[1].set_result(value)
        elif self._on_frame is not None:
            self._on_frame(channel, value)
        else:
            log.debug("ignoring AMQP frame %r on channel %d", value, channel)

    def _on_heartbeat(self, _channel: int, _value: Heartbeat | incoming.Heartbeat) -> None:
        pass

    def _on_connection_close(self, _channel: int, value: spec.Connection.Close) -> None:
        with contextlib.suppress(Exception):
            self.send(0, spec.Connection.CloseOk())
        self._fail(close_error("connection", value.reply_code, value.reply_text))

    def _on_blocked(self, _channel: int, value: spec.Connection.Blocked) -> None:
        self.blocked = True
        log.warning("RabbitMQ blocked the connection: %s", value.reason)

    def _on_unblocked(self, _channel: int, _value: spec.Connection.Unblocked) -> None:
        self.blocked = False
        log.info("RabbitMQ unblocked the connection")

    def _on_channel_close(self, channel: int, value: spec.Channel.Close) -> None:
        """Acknowledge; a pending RPC on the channel fails, otherwise ``on_frame`` decides."""
        self.send(channel, spec.Channel.CloseOk())
        pending = self._rpc.get(channel)
        if pending is not None:
            if not pending[1].done():
                pending[1].set_exception(
                    close_error(f"channel {channel}", value.reply_code, value.reply_text)
                )
        elif self._on_frame is not None:
            self._on_frame(channel, value)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_HANDLERS: dict[type, Callable[[Connection, int, Any], None]] = {
    incoming.Heartbeat: Connection._on_heartbeat,
    Heartbeat: Connection._on_heartbeat,
    spec.Connection.Close: Connection._on_connection_close,
    spec.Connection.Blocked: Connection._on_blocked,
    spec.Connection.Unblocked: Connection._on_unblocked,
    spec.Channel.Close: Connection._on_channel_close,
}

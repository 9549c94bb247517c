"""Publish envelopes with publisher confirms; report what each broker event settled.

The glue between a ``Connection`` (bytes and frames) and a ``ConfirmWindow``
(what is unsettled): one confirm channel, ``mandatory`` on every publish, a
window bounded in messages and bytes, and one ``on_outcome`` callback. Publishes
go out in call order on that one channel, so the broker sees them in commit
order. The publisher never retries: a lost confirm means "unknown" and only
the slot can replay safely.

Hot path: ``publish_nowait`` (else ``publish``, which may wait) encodes with
``amqp_wire`` (no pamqp objects), appends the bytes to a list that one
``call_soon`` writes in a single ``transport.write``, and awaits nothing
unless the window is full, the transport paused writing, or the message id is
already in flight (measured:
aio-pika's per-message futures cost more CPU than the whole relay, see
docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pamqp import commands as spec

from cdc_relay import reasons
from cdc_relay.amqp.address import AmqpAddress, redact
from cdc_relay.amqp.connection import ConnectError, Connection
from cdc_relay.amqp.incoming import Ack, Body, Nack, Return, ReturnedHeader
from cdc_relay.amqp.replies import NOT_FOUND, PRECONDITION_FAILED, close_error
from cdc_relay.amqp.window import ConfirmWindow, Outcome, PublishFailed
from cdc_relay.amqp_wire import (
    PublishEncoder,
    encode_content,
    encode_method_publish,
    encode_properties,
)
from cdc_relay.envelope import Envelope

if TYPE_CHECKING:
    from cdc_relay.config import Settings

log = logging.getLogger(__name__)

CHANNEL = 1  # the confirm channel: publishes only
TOPOLOGY_CHANNEL = 2  # declarations, so a refused one never closes the confirm channel
TRIAL_CHANNEL = 3  # trial publishes (``try_publish``), opened and closed for each
WATCH_INTERVAL = 0.5  # seconds between confirm-timeout checks

OnOutcome = Callable[[Outcome], None]


class UnpublishableMessage(ValueError):
    """This envelope cannot be encoded (nothing was queued); dead-letter it and go on."""


class ExchangeError(Exception):
    """An exchange declaration was refused (e.g. it exists with another type)."""

    def __init__(self, message: str, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class Publisher:
    """A confirm-mode publishing channel with a bounded in-flight window."""

    def __init__(
        self,
        urls: list[str],
        *,
        max_in_flight: int,
        max_in_flight_bytes: int = 64 * 1024 * 1024,
        confirm_timeout: float = 30.0,
        heartbeat: int = 10,
        connect_timeout: float = 10.0,
        on_outcome: OnOutcome,
    ) -> None:
        self._urls = list(urls)
        self._window = ConfirmWindow(max_in_flight, max_in_flight_bytes)
        self._confirm_timeout = confirm_timeout
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._on_outcome = on_outcome
        self._loop = asyncio.get_running_loop()
        self._conn: Connection | None = None
        self._encoder = PublishEncoder(CHANNEL, 131072)
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._settled = asyncio.Event()  # set whenever something settles or is lost
        self._error: PublishFailed | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._returning: Return | None = None
        self._last_return: tuple[Return, PublishFailed] | None = None
        self._return_id = ""
        self._return_left = 0
        self._topology_open = False
        self._topology_lock = asyncio.Lock()
        self.connected_url: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, on_outcome: OnOutcome, *, max_in_flight: int | None = None
    ) -> Publisher:
        """The relay's publisher as the settings ask (run, resync and replay alike)."""
        return cls(
            settings.amqp_urls,
            max_in_flight=max_in_flight or settings.max_in_flight,
            max_in_flight_bytes=settings.max_in_flight_bytes,
            confirm_timeout=settings.confirm_timeout,
            heartbeat=settings.amqp_heartbeat,
            connect_timeout=settings.amqp_connect_timeout,
            on_outcome=on_outcome,
        )

    # -- connection ----------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the first node that completes the handshake, in random order."""
        if self._conn is not None:  # a reconnect: the old connection must not feed the window
            self._conn.abort()
        urls = list(self._urls)
        random.shuffle(urls)
        errors: list[str] = []
        rejected = 0
        for url in urls:
            try:
                await self._attempt(AmqpAddress.parse(url))
            except (OSError, TimeoutError, PublishFailed, ValueError) as exc:
                errors.append(f"{redact(url)}: {exc or type(exc).__name__}")
                rejected += isinstance(exc, ssl.SSLCertVerificationError)
                continue
            self.connected_url = redact(url)
            return
        error = ConnectError("cannot connect to RabbitMQ: " + "; ".join(errors))
        error.certificate_rejected = rejected == len(urls)
        raise error

    async def _attempt(self, address: AmqpAddress) -> None:
        """One isolated attempt: a stale connection can only report to its own closure."""
        connection: Connection | None = None

        def lost(error: PublishFailed) -> None:
            if connection is not None and connection is self._conn:
                self._lose(error)

        connection = await Connection.open(
            address,
            on_frame=self.frame_received,
            on_lost=lost,
            heartbeat=self._heartbeat,
            timeout=self._connect_timeout,
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                await connection.open_channel(CHANNEL)
                await connection.rpc(CHANNEL, spec.Confirm.Select(), spec.Confirm.SelectOk)
        except BaseException:
            connection.abort()
            raise
        self._adopt(connection)

    def _adopt(self, connection: Connection) -> None:
        """Start using an open connection whose channel 1 is in confirm mode."""
        self._conn = connection
        self._error = None
        self._window = ConfirmWindow(self._window.limit, self._window.byte_limit)
        self._encoder = PublishEncoder(CHANNEL, connection.frame_max)
        self._topology_open = False
        self._watch = self._loop.call_later(WATCH_INTERVAL, self._check_confirm_timeout)

    def _check_confirm_timeout(self) -> None:
        oldest = self._window.oldest_sent_at
        if oldest is not None and time.monotonic() - oldest > self._confirm_timeout:
            self._lose(
                PublishFailed(
                    f"no confirm within {self._confirm_timeout:g}s"
                    + (" (connection blocked by a broker alarm)" if self.blocked else ""),
                    code=reasons.TIMEOUT,
                )
            )
            return
        self._watch = self._loop.call_later(WATCH_INTERVAL, self._check_confirm_timeout)

    def _lose(self, error: PublishFailed) -> None:
        """The confirm channel is gone: report everything unsettled as lost, once."""
        if self._error is not None:
            return
        self._error = error
        if self._watch is not None:
            self._watch.cancel()
        self._settled.set()
        outcome = self._window.fail_all(error)
        if self._conn is not None:
            self._conn.abort()
        self._on_outcome(outcome)

    @property
    def blocked(self) -> bool:
        return self._conn is not None and self._conn.blocked

    @property
    def in_flight(self) -> int:
        return self._window.in_flight

    @property
    def in_flight_bytes(self) -> int:
        return self._window.in_flight_bytes

    # -- incoming frames -------------------------------------------------------------

    def frame_received(self, channel: int, value: Any) -> None:
        """The connection's one frame callback: broker events for our channels."""
        handler = _FRAME_HANDLERS.get(type(value))
        if handler is not None:
            handler(self, channel, value)
        else:
            log.debug("ignoring AMQP frame %r on channel %d", value, channel)

    def _on_ack(self, _channel: int, value: Ack) -> None:
        outcome = self._window.ack(value.delivery_tag, value.multiple)
        if outcome:
            self._settled.set()
            self._on_outcome(outcome)

    def _on_nack(self, _channel: int, value: Nack) -> None:
        outcome = self._window.nack(value.delivery_tag, value.multiple)
        if outcome:
            self._settled.set()
            self._on_outcome(outcome)

    def _on_return(self, channel: int, value: Return) -> None:
        if channel == CHANNEL:  # a trial publish is not mandatory; never mix channels anyway
            self._returning = value

    def _on_content_header(self, _channel: int, value: ReturnedHeader) -> None:
        if self._returning is None:
            log.debug("ignoring a content header outside a basic.return")
            return
        self._return_id = value.message_id or ""
        self._return_left = value.body_size
        if not self._return_left:
            self._returned()

    def _on_content_body(self, _channel: int, value: Body) -> None:
        if self._returning is None:
            return
        self._return_left -= value.size
        if self._return_left <= 0:
            self._returned()  # the body itself is not needed

    def _returned(self) -> None:
        frame = self._returning
        assert frame is not None
        self._returning = None
        # Returns come in runs alike (no queue bound for a routing key): one error for a run.
        last = self._last_return
        if last is not None and last[0] == frame:
            error = last[1]
        else:
            error = PublishFailed(
                f"returned by broker: {frame.reply_code} {frame.reply_text} "
                f"(exchange {frame.exchange!r}, routing key {frame.routing_key!r})",
                returned=True,
                reply_code=frame.reply_code,
            )
            self._last_return = (frame, error)
        try:
            self._window.returned(self._return_id, error)
        except PublishFailed as unmatched:
            self._lose(unmatched)

    def _on_channel_close(self, channel: int, value: spec.Channel.Close) -> None:
        if channel == CHANNEL:
            self._lose(close_error("channel", value.reply_code, value.reply_text))
        elif channel == TOPOLOGY_CHANNEL:
            self._topology_open = False

    # -- publishing ------------------------------------------------------------------

    def publish_nowait(self, seq: int, envelope: Envelope) -> bool:
        """Queue one message if nothing has to be waited for; else False, and nothing queued.

        The pump's fast path: no coroutine per message. False (the window is
        full, the message id is in flight, the transport paused writing, or the
        publisher failed) means "await ``publish``", which waits or raises.
        Raises UnpublishableMessage (nothing queued) as ``publish`` does.
        """
        conn = self._conn
        window = self._window
        message_id = envelope.message_id
        if self._error is not None or conn is None or conn.paused or not window.can_add(message_id):
            return False
        try:
            data = self._encoder.encode(envelope)
        except Exception as exc:  # any encoding failure is this message's, not the session's
            raise UnpublishableMessage(f"cannot encode message: {exc!r}"[:500]) from exc
        window.add(seq, message_id, envelope.exchange, len(data), time.monotonic())
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    async def publish(self, seq: int, envelope: Envelope) -> None:
        """Queue one message; returns once it is on its way (the window had room).

        Raises UnpublishableMessage (nothing queued) when the envelope cannot be
        encoded, PublishFailed when the connection is gone.
        """
        conn = self._conn
        if self._error is not None:
            raise self._error
        if conn is None:
            raise PublishFailed("publisher is not connected")
        try:
            data = self._encoder.encode(envelope)
        except Exception as exc:  # any encoding failure is this message's, not the session's
            raise UnpublishableMessage(f"cannot encode message: {exc!r}"[:500]) from exc
        window = self._window
        message_id = envelope.message_id
        while conn.paused or not window.can_add(message_id):
            self._flush()
            if conn.paused:
                await conn.wait_writable()
            else:
                self._settled.clear()
                await self._settled.wait()
            if self._error is not None:
                raise self._error
        window.add(seq, message_id, envelope.exchange, len(data), time.monotonic())
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write everything queued since the last flush in one go."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self._conn is not None:
            self._conn.write(data)

    async def wait_confirmed(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False on timeout or if the channel was lost."""
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                while not self._window.empty and self._error is None:
                    self._settled.clear()
                    await self._settled.wait()
        except TimeoutError:
            return False
        return self._error is None

    # -- topology --------------------------------------------------------------------

    async def declare_exchange(
        self, name: str, kind: str = "topic", *, passive: bool = False
    ) -> bool:
        """Declare a durable exchange over this connection, on its own channel.

        Returns False when ``passive`` and the exchange does not exist; raises
        ExchangeError when it exists with another type (406) or is refused.
        """
        if self._error is not None:
            raise self._error
        if self._conn is None:
            raise PublishFailed("publisher is not connected")
        async with self._topology_lock:
            if not self._topology_open:
                await self._conn.open_channel(TOPOLOGY_CHANNEL)
                self._topology_open = True
            try:
                await _declare(self._conn, TOPOLOGY_CHANNEL, name, kind, passive)
            except PublishFailed as exc:
                self._topology_open = False  # the broker closed the channel
                if passive and exc.reply_code == NOT_FOUND:
                    return False
                raise _exchange_error(name, kind, exc) from None
            return True

    async def exchange_refusal(self, exchange: str, known: dict[str, str | None]) -> str | None:
        """Why the broker would refuse publishes to ``exchange`` (missing, forbidden), or None.

        A refused publish closes the confirm channel; a one-pass publisher
        (``resync``, ``dead-letters replay``) asks first, once per exchange
        (``known`` remembers the answers), with a passive declare on the
        topology channel. The default exchange ``""`` always exists.
        """
        if exchange == "" or exchange in known:
            return known.get(exchange)
        why: str | None = None
        try:
            if not await self.declare_exchange(exchange, passive=True):
                why = "404 NOT_FOUND (no such exchange)"
        except ExchangeError as exc:
            why = str(exc)
        known[exchange] = (
            None if why is None else f"exchange {exchange!r} refused by the broker: {why}"
        )
        return known[exchange]

    async def try_publish(self, envelope: Envelope) -> PublishFailed | None:
        """Would the broker take this publish now? Ask with a publish that is rolled back.

        The re-check of a remembered refusal (limits.BrokerLimits). A passive
        exchange.declare would prove only that the exchange exists: RabbitMQ
        checks no permission for it, so it cannot see a write permission revoked
        and restored, nor a message size limit. A basic.publish inside tx.select
        meets every check a real one meets (exchange exists, write and topic
        permission, message size) when it arrives, and tx.rollback discards it
        unrouted, so no consumer sees it. It goes on its own channel, opened and
        closed here, so a refusal (which closes that channel) never touches the
        confirm channel; not mandatory, so no basic.return can come.

        Returns None if the broker took it, else the refusal (naming the exchange
        or the size limit). Raises PublishFailed if the connection is gone or does
        not answer within the confirm timeout, UnpublishableMessage if the
        envelope cannot be encoded.
        """
        if self._error is not None:
            raise self._error
        conn = self._conn
        if conn is None:
            raise PublishFailed("publisher is not connected")
        try:
            flags, properties = encode_properties(envelope)
            data = encode_method_publish(
                TRIAL_CHANNEL, envelope.exchange, envelope.routing_key, False
            ) + encode_content(TRIAL_CHANNEL, flags, properties, envelope.body, conn.frame_max)
        except Exception as exc:
            raise UnpublishableMessage(f"cannot encode message: {exc!r}"[:500]) from exc
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await conn.open_channel(TRIAL_CHANNEL)
                await conn.rpc(TRIAL_CHANNEL, spec.Tx.Select(), spec.Tx.SelectOk)
                conn.write(data)
                try:
                    await conn.rpc(TRIAL_CHANNEL, spec.Tx.Rollback(), spec.Tx.RollbackOk)
                except PublishFailed as exc:
                    if conn.error is not None or exc.reply_code is None:
                        raise  # the connection, not the channel
                    return exc  # the broker closed the trial channel: still refused
                await conn.rpc(
                    TRIAL_CHANNEL,
                    spec.Channel.Close(200, "trial publish rolled back", 0, 0),
                    spec.Channel.CloseOk,
                )
        except TimeoutError:
            raise PublishFailed(
                f"no answer to a trial publish within {self._confirm_timeout:g}s"
            ) from None
        return None

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        """Close politely if we can; our own close is never reported as a failure."""
        if self._error is None:
            self._error = PublishFailed("publisher closed")
        if self._watch is not None:
            self._watch.cancel()
        self._settled.set()
        if self._conn is not None:
            self._flush()
            await self._conn.close()


_FRAME_HANDLERS: dict[type, Callable[[Publisher, int, Any], None]] = {
    Ack: Publisher._on_ack,
    Nack: Publisher._on_nack,
    Return: Publisher._on_return,
    ReturnedHeader: Publisher._on_content_header,
    Body: Publisher._on_content_body,
    spec.Channel.Close: Publisher._on_channel_close,
}


async def _declare(
    connection: Connection, channel: int, name: str, kind: str, passive: bool
) -> None:
    await connection.rpc(
        channel,
        spec.Exchange.Declare(exchange=name, exchange_type=kind, passive=passive, durable=True),
        spec.Exchange.DeclareOk,
    )


def _exchange_error(name: str, kind: str, exc: PublishFailed) -> ExchangeError:
    if exc.reply_code == PRECONDITION_FAILED:
        return ExchangeError(
            f"exchange {name!r} exists with a different type or arguments than a durable "
            f"{kind} exchange: {exc.reason}",
            exc.reply_code,
        )
    return ExchangeError(f"cannot declare exchange {name!r}: {exc.reason}", exc.reply_code)


async def declare_exchange(
    urls: list[str], name: str, kind: str = "topic", *, timeout: float = 10.0
) -> str:
    """Make sure a durable exchange exists; "created" or "already exists".

    The one way to declare an exchange outside a running publisher (``init``,
    tests, bench): each URL in turn until one node answers. An existing
    exchange is re-declared actively too, so one of another type is an error.
    """
    errors: list[str] = []
    for url in urls:
        try:
            connection = await Connection.open(AmqpAddress.parse(url), heartbeat=0, timeout=timeout)
        except (OSError, TimeoutError, PublishFailed, ValueError) as exc:
            errors.append(f"{redact(url)}: {exc or type(exc).__name__}")
            continue
        try:
            async with asyncio.timeout(timeout):
                await connection.open_channel(1)
                try:
                    await _declare(connection, 1, name, kind, passive=True)
                    existed = True
                except PublishFailed as exc:
                    if exc.reply_code != NOT_FOUND:
                        raise _exchange_error(name, kind, exc) from None
                    existed = False
                    await connection.open_channel(2)
                try:
                    await _declare(connection, 2 if not existed else 1, name, kind, passive=False)
                except PublishFailed as exc:
                    raise _exchange_error(name, kind, exc) from None
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
        return "already exists" if existed else "created"
    raise ConnectError("cannot connect to RabbitMQ: " + "; ".join(errors))

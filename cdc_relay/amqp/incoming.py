"""The broker's frames on a confirm channel, decoded by hand: acks, nacks, returns, content.

pamqp builds and validates an object per frame, and decodes every property
and header of a returned message; with no queue bound (every message
returned) that was most of the relay's CPU per row. The publisher needs
little of it: an ack's tag and ``multiple`` bit, a return's reply, the
returned message's id and body size. So those frames are decoded here and
everything else (connection and channel control, RPC replies) is left to
pamqp: ``decode`` answers None for it.

Pure functions over bytes; tests check them against pamqp for random frames.
A malformed frame raises ``FrameError``, which ends the connection as a
protocol error, as pamqp's own errors do.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["Ack", "Body", "FrameError", "Heartbeat", "Nack", "Return", "ReturnedHeader", "decode"]

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
BASIC_CLASS: Final = 60

_ACK: Final = 80
_NACK: Final = 120
_RETURN: Final = 50
_CLASS_METHOD: Final = struct.Struct("!HH")
_TAG_BITS: Final = struct.Struct("!QB")  # ack, nack: delivery tag, bits
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_HEADER_HEAD: Final = struct.Struct("!HHQH")  # class, weight, body size, property flags

# Basic property flags up to message_id, in wire order.
_CONTENT_TYPE: Final = 1 << 15  # short string
_CONTENT_ENCODING: Final = 1 << 14  # short string
_HEADERS: Final = 1 << 13  # table: a long size, then its bytes
_DELIVERY_MODE: Final = 1 << 12  # octet
_PRIORITY: Final = 1 << 11  # octet
_CORRELATION_ID: Final = 1 << 10  # short string
_REPLY_TO: Final = 1 << 9  # short string
_EXPIRATION: Final = 1 << 8  # short string
_MESSAGE_ID: Final = 1 << 7  # short string
_CONTINUED: Final = 1  # another property-flags word follows (never for the basic class)


class FrameError(ValueError):
    """A frame of a kind decoded here that does not hold what its kind says."""


@dataclass(slots=True, frozen=True)
class Ack:
    """basic.ack: the publishes up to (``multiple``) or at ``delivery_tag`` are confirmed."""

    delivery_tag: int
    multiple: bool


@dataclass(slots=True, frozen=True)
class Nack:
    """basic.nack: the broker refused the publishes up to or at ``delivery_tag``."""

    delivery_tag: int
    multiple: bool


@dataclass(slots=True, frozen=True)
class Return:
    """basic.return: the next content header and body frames are the returned message."""

    reply_code: int
    reply_text: str
    exchange: str
    routing_key: str


@dataclass(slots=True, frozen=True)
class ReturnedHeader:
    """A basic-class content header: only what matching a return needs."""

    body_size: int
    message_id: str | None


@dataclass(slots=True, frozen=True)
class Body:
    """A content body frame: its size (the relay never needs a returned body's bytes)."""

    size: int


@dataclass(slots=True, frozen=True)
class Heartbeat:
    """A heartbeat frame."""


HEARTBEAT: Final = Heartbeat()

Incoming = Ack | Nack | Return | ReturnedHeader | Body | Heartbeat


def _short_string(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    after = pos + 1 + buf[pos]
    if after > end:
        raise FrameError("short string runs past the end of its frame")
    try:
        return buf[pos + 1 : after].decode(), after
    except UnicodeDecodeError as exc:
        raise FrameError(f"short string is not UTF-8: {exc}") from None


def _method(buf: bytes | bytearray, start: int, end: int) -> Incoming | None:
    class_id, method_id = _CLASS_METHOD.unpack_from(buf, start)
    if class_id != BASIC_CLASS:
        return None
    pos = start + 4
    if method_id in (_ACK, _NACK):
        if end - pos != 9:
            raise FrameError(f"basic method {method_id} of {end - start} bytes")
        tag, bits = _TAG_BITS.unpack_from(buf, pos)
        return Ack(tag, bool(bits & 1)) if method_id == _ACK else Nack(tag, bool(bits & 1))
    if method_id == _RETURN:
        (reply_code,) = _U16.unpack_from(buf, pos)
        reply_text, pos = _short_string(buf, pos + 2, end)
        exchange, pos = _short_string(buf, pos, end)
        routing_key, pos = _short_string(buf, pos, end)
        if pos != end:
            raise FrameError("basic.return with trailing bytes")
        return Return(reply_code, reply_text, exchange, routing_key)
    return None


def _header(buf: bytes | bytearray, start: int, end: int) -> ReturnedHeader | None:
    if end - start < _HEADER_HEAD.size:
        raise FrameError("content header frame too short")
    class_id, _, body_size, flags = _HEADER_HEAD.unpack_from(buf, start)
    if class_id != BASIC_CLASS or flags & _CONTINUED:
        return None
    if not flags & _MESSAGE_ID:
        return ReturnedHeader(body_size, None)
    # Skip the properties before message_id (unrolled: one of these per returned message).
    pos = start + _HEADER_HEAD.size
    if flags & _CONTENT_TYPE:
        pos += 1 + buf[pos]
    if flags & _CONTENT_ENCODING:
        pos += 1 + buf[pos]
    if flags & _HEADERS:
        pos += 4 + _U32.unpack_from(buf, pos)[0]
    if flags & _DELIVERY_MODE:
        pos += 1
    if flags & _PRIORITY:
        pos += 1
    if flags & _CORRELATION_ID:
        pos += 1 + buf[pos]
    if flags & _REPLY_TO:
        pos += 1 + buf[pos]
    if flags & _EXPIRATION:
        pos += 1 + buf[pos]
    if pos >= end:
        raise FrameError("content header properties run past the end of the frame")
    message_id, _ = _short_string(buf, pos, end)
    return ReturnedHeader(body_size, message_id)


def decode(kind: int, buf: bytes | bytearray, start: int, end: int) -> Incoming | None:
    """The frame whose type is ``kind`` and payload ``buf[start:end]``, or None for pamqp.

    Raises FrameError (or struct.error/IndexError, for the caller to treat alike)
    for a malformed frame of a kind decoded here.
    """
    if kind == FRAME_METHOD:
        if end - start < 4:
            raise FrameError("method frame too short")
        return _method(buf, start, end)
    if kind == FRAME_BODY:
        return Body(end - start)
    if kind == FRAME_HEADER:
        return _header(buf, start, end)
    if kind == FRAME_HEARTBEAT and start == end:
        return HEARTBEAT
    return None

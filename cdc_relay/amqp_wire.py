"""AMQP 0-9-1 publish frames, encoded by hand for the hot path.

pamqp builds a frame object per message and marshals it field by field; at
tens of thousands of messages per second that object work dominates the
relay's CPU. Publishing needs only three frame kinds (basic.publish, content
header, body), so they are encoded here directly, with the method frame cached
per (exchange, routing key). Pure functions over bytes; tests check every
encoding byte for byte against pamqp.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import encode as pamqp_encode

from cdc_relay.envelope import Envelope

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = b"\xce"
BASIC_CLASS = 60

_FRAME_HEAD = struct.Struct("!BHI")
_HEADER_PREFIX = struct.Struct("!HHQH")  # class, weight, body size, property flags
_HEADER_FRAME_HEAD = struct.Struct("!BHIHHQH")  # _FRAME_HEAD, then _HEADER_PREFIX
_U32 = struct.Struct("!I")
_HEADER_OVERHEAD = 8 + _HEADER_PREFIX.size  # frame head and end, class to property flags
_U64 = struct.Struct("!Q")
_DOUBLE = struct.Struct("!d")
NESTED_KEY_MAX = 128  # bytes; AMQP's limit for field names

# Property flag bits, in wire order (AMQP 0-9-1 basic class).
_CONTENT_TYPE = 1 << 15
_CONTENT_ENCODING = 1 << 14
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_CORRELATION_ID = 1 << 10
_REPLY_TO = 1 << 9
_EXPIRATION = 1 << 8
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_USER_ID = 1 << 4
_APP_ID = 1 << 3


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEAD.pack(kind, channel, len(payload)) + payload + FRAME_END


def short_string(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def encode_method_publish(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """The basic.publish method frame (class 60, method 40)."""
    payload = (
        struct.pack("!HHH", BASIC_CLASS, 40, 0)
        + short_string(exchange)
        + short_string(routing_key)
        + bytes((1 if mandatory else 0,))
    )
    return frame(FRAME_METHOD, channel, payload)


def encode_properties(envelope: Envelope) -> tuple[int, bytes]:
    """Property flags and the property list of an envelope's content header.

    Empty strings are left out, as pamqp (and so aio-pika) does. Strings that
    repeat from message to message (content type, event type, app id) come
    from a small cache (looked up inline: a call per property cost more than
    the lookup); the message id never repeats and is encoded each time.
    """
    flags = 0
    parts: list[bytes] = []
    append = parts.append
    cached = _short_strings.get
    value: Any = envelope.content_type
    if value:
        flags |= _CONTENT_TYPE
        append(cached(value) or _repeated_short_string(value))
    value = envelope.content_encoding
    if value:
        flags |= _CONTENT_ENCODING
        append(cached(value) or _repeated_short_string(value))
    value = envelope.headers
    if value:
        flags |= _HEADERS
        append(encode_table(value))
    value = envelope.delivery_mode
    if value is not None:
        flags |= _DELIVERY_MODE
        append(bytes((value,)))
    value = envelope.priority
    if value is not None:
        flags |= _PRIORITY
        append(bytes((value,)))
    if envelope.correlation_id:
        flags |= _CORRELATION_ID
        append(short_string(envelope.correlation_id))
    if envelope.reply_to:
        flags |= _REPLY_TO
        append(short_string(envelope.reply_to))
    if envelope.expiration:
        flags |= _EXPIRATION
        append(short_string(envelope.expiration))
    if envelope.message_id:
        flags |= _MESSAGE_ID
        append(short_string(envelope.message_id))
    value = envelope.timestamp
    if value is not None:
        flags |= _TIMESTAMP
        append(_U64.pack(int(value.timestamp())))  # whole seconds
    value = envelope.type
    if value:
        flags |= _TYPE
        append(cached(value) or _repeated_short_string(value))
    if envelope.user_id:
        flags |= _USER_ID
        append(_repeated_short_string(envelope.user_id))
    value = envelope.app_id
    if value:
        flags |= _APP_ID
        append(cached(value) or _repeated_short_string(value))
    return flags, b"".join(parts)


_CACHE_LIMIT = 4096  # entries; a cache that fills up is simply emptied
_short_strings: dict[str, bytes] = {}
_table_keys: dict[str, bytes] = {}
_string_entry_heads: dict[str, bytes] = {}


def _repeated_short_string(value: str) -> bytes:
    encoded = _short_strings.get(value)
    if encoded is None:
        encoded = short_string(value)
        if len(_short_strings) >= _CACHE_LIMIT:
            _short_strings.clear()
        _short_strings[value] = encoded
    return encoded


def _string_entry_head(key: str) -> bytes:
    """A field-table key followed by the type of a string value ('S')."""
    encoded = _string_entry_heads.get(key)
    if encoded is None:
        encoded = _table_key(key) + b"S"
        if len(_string_entry_heads) >= _CACHE_LIMIT:
            _string_entry_heads.clear()
        _string_entry_heads[key] = encoded
    return encoded


def _table_key(key: str) -> bytes:
    """A field-table key as encoded on the wire (length byte + UTF-8)."""
    encoded = _table_keys.get(key)
    if encoded is None:
        raw_key = key.encode()
        if len(raw_key) > 255:
            raise ValueError(f"header name longer than 255 bytes: {key[:40]!r}...")
        encoded = bytes((len(raw_key),)) + raw_key
        if len(_table_keys) >= _CACHE_LIMIT:
            _table_keys.clear()
        _table_keys[key] = encoded
    return encoded


def encode_table(table: dict[str, Any]) -> bytes:
    """A field table; plain string values (the common case) skip pamqp's dispatch.

    The cache lookups are inlined: a function call per entry cost more than
    the lookup itself (measured).
    """
    parts: list[bytes] = []
    append = parts.append
    pack = _U32.pack
    heads = _string_entry_heads
    for key, value in table.items():
        if type(value) is str:
            raw = value.encode()
            head = heads.get(key)
            if head is None:
                head = _string_entry_head(key)
            append(head + pack(len(raw)) + raw)
        else:
            append(_table_key(key) + encode_value(value))
    body = b"".join(parts)
    return pack(len(body)) + body


def encode_value(value: Any) -> bytes:
    """One field value; floats as doubles, nested tables and arrays encoded here.

    pamqp encodes a float as a 32-bit 'f', which silently changes most values
    (0.1 arrives as 0.10000000149...); a header value keeps its type, so floats
    go out as 'd' (IEEE double, what JSON numbers are). Nested tables and
    arrays are encoded here so that rule holds at every depth; everything else
    (ints, bools, None, decimals, timestamps) is pamqp's, byte for byte.
    """
    if type(value) is str:
        raw = value.encode()
        return b"S" + _U32.pack(len(raw)) + raw
    if isinstance(value, float):
        return b"d" + _DOUBLE.pack(value)
    if isinstance(value, dict):
        return b"F" + _nested_table(value)
    if isinstance(value, list):
        body = b"".join([encode_value(item) for item in value])
        return b"A" + _U32.pack(len(body)) + body
    return pamqp_encode.encode_table_value(value)


def _nested_table(table: dict[str, Any]) -> bytes:
    """A table inside a header value: keys over 128 bytes are refused, not truncated.

    128 bytes is the AMQP limit for field names; pamqp truncates longer ones
    (two keys could even collide), which would change the message unnoticed.
    """
    parts: list[bytes] = []
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"header table keys must be strings, not {type(key).__name__}")
        raw_key = key.encode()
        if len(raw_key) > NESTED_KEY_MAX:
            raise ValueError(
                f"nested header name longer than {NESTED_KEY_MAX} bytes: {key[:40]!r}..."
            )
        parts.append(bytes((len(raw_key),)) + raw_key + encode_value(value))
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def encode_content(
    channel: int, flags: int, properties: bytes, body: bytes, frame_max: int
) -> bytes:
    """Content header frame plus as many body frames as frame_max requires.

    The header cannot be split: a property block larger than a frame is
    refused here (ValueError) rather than by the broker closing the connection.
    """
    if len(properties) + _HEADER_OVERHEAD > frame_max:
        raise ValueError(
            f"message properties ({len(properties)} bytes) do not fit in one {frame_max}-byte frame"
        )
    header = frame(
        FRAME_HEADER,
        channel,
        _HEADER_PREFIX.pack(BASIC_CLASS, 0, len(body), flags) + properties,
    )
    if not body:
        return header
    chunk = frame_max - 8
    if len(body) <= chunk:
        return header + _FRAME_HEAD.pack(FRAME_BODY, channel, len(body)) + body + FRAME_END
    parts = [header]
    for start in range(0, len(body), chunk):
        parts.append(frame(FRAME_BODY, channel, body[start : start + chunk]))
    return b"".join(parts)


class PublishEncoder:
    """Encodes envelopes for one channel, caching the method frame per destination."""

    __slots__ = ("_methods", "channel", "frame_max")

    def __init__(self, channel: int, frame_max: int) -> None:
        self.channel = channel
        self.frame_max = frame_max
        self._methods: dict[tuple[str, str], bytes] = {}

    def encode(self, envelope: Envelope) -> bytes:
        key = (envelope.exchange, envelope.routing_key)
        method = self._methods.get(key)
        if method is None:
            method = encode_method_publish(self.channel, key[0], key[1], True)
            if len(self._methods) > 10_000:
                self._methods.clear()
            self._methods[key] = method
        flags, properties = encode_properties(envelope)
        body = envelope.body
        size = len(body)
        frame_max = self.frame_max
        if not 0 < size <= frame_max - 8 or len(properties) + _HEADER_OVERHEAD > frame_max:
            return method + encode_content(self.channel, flags, properties, body, frame_max)
        # The common case (a body in one frame), as encode_content writes it, in one join.
        channel = self.channel
        return b"".join(
            (
                method,
                _HEADER_FRAME_HEAD.pack(
                    FRAME_HEADER,
                    channel,
                    len(properties) + _HEADER_PREFIX.size,
                    BASIC_CLASS,
                    0,
                    size,
                    flags,
                ),
                properties,
                FRAME_END,
                _FRAME_HEAD.pack(FRAME_BODY, channel, size),
                body,
                FRAME_END,
            )
        )

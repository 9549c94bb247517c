"""The AMQP envelope and the limits of what one basic.publish can carry.

Pure: no I/O. These checks are the one rule for "can the broker ever take
this?": the router applies them to every row (a row that fails is
dead-lettered), and ``cdc_relay.outbox`` reaches them through the router at
enqueue time so the application hears about it while it can still fix the call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from cdc_relay.rows import OutboxRow, UnmappableRow

APP_ID = "cdc-relay"
MAX_ROUTING_KEY_BYTES = 255
MAX_SHORT_STRING_BYTES = 255  # message_id, type, header names: AMQP short strings
# Header values the publisher can encode: AMQP signed 64-bit integers and pamqp's
# 32-bit float. A value outside these would fail every publish of the row, forever.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Nesting bound for header values: deeper tables overflow recursive encoders
# (pamqp's, Python's repr) long before they mean anything to a consumer.
MAX_HEADER_DEPTH = 64
# Keys of nested tables: AMQP 0-9-1 limits field names to 128 characters, and a
# longer one would be truncated by some encoders, silently changing the header.
MAX_NESTED_KEY_BYTES = 128
# The content header (all properties) must fit one frame. RabbitMQ's default
# frame_max is 131072; what is left after the other properties (at most eight
# short strings) bounds the encoded header table.
MAX_HEADER_TABLE_BYTES = 131072 - 8 - 14 - 8 * 256 - 64
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Envelope:
    """Everything the publisher needs for one basic.publish."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str | None
    headers: dict[str, Any]
    timestamp: datetime | None = None
    content_type: str = "application/json"
    content_encoding: str | None = None
    correlation_id: str | None = None
    app_id: str = APP_ID
    delivery_mode: int = 2
    priority: int | None = None
    reply_to: str | None = None
    expiration: str | None = None  # milliseconds, as RabbitMQ wants it: a decimal string
    user_id: str | None = None


def parse_timestamptz(text: str | None) -> datetime | None:
    """Postgres timestamptz text (session TimeZone=UTC) -> aware datetime, or None.

    None when AMQP cannot carry it ('infinity', BC, past 9999, before 1970: the
    AMQP timestamp is unsigned): no timestamp rather than no message.
    """
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    if value.tzinfo is None:  # a plain timestamp column: UTC, not the relay host's zone
        value = value.replace(tzinfo=UTC)
    return None if value < EPOCH else value


def check_headers(headers: dict[str, Any]) -> None:
    """Raise UnmappableRow unless an AMQP header table can carry these headers.

    Shared by the router and the enqueue helpers: top-level names are short
    strings, nested names at most 128 bytes, integers int64, numbers finite
    within the encoder's float, nesting at most MAX_HEADER_DEPTH deep, and the
    encoded table small enough for one content-header frame.
    """
    size = 4
    for key, value in headers.items():
        if type(key) is not str:
            raise UnmappableRow(f"header names must be strings, got {key!r}")
        if len(key) > MAX_SHORT_STRING_BYTES // 4:
            check_short_string("header name", key)
        # Strings first: the common case, sized without encoding ASCII.
        if type(value) is str:
            size += 6 + _utf8_len(key) + _utf8_len(value)
        else:
            size += 1 + _utf8_len(key) + _header_value_size(key, value, 1)
    if size > MAX_HEADER_TABLE_BYTES:
        raise UnmappableRow(
            f"headers take {size} bytes on the wire, more than the {MAX_HEADER_TABLE_BYTES}"
            " that fit one AMQP frame"
        )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _header_value_size(key: str, value: Any, depth: int) -> int:
    """Upper bound of the encoded size of one field value; raises if it cannot be encoded."""
    kind = type(value)
    if kind is str:
        return 5 + _utf8_len(value)
    if kind is bool or value is None:
        return 2
    if kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise UnmappableRow(f"header {key!r}: integer {value} does not fit AMQP's int64")
        return 9
    if kind is float:  # an AMQP double: every float JSON can hold fits
        return 9
    if kind is dict or kind is list:
        if depth >= MAX_HEADER_DEPTH:
            raise UnmappableRow(f"header {key!r} is nested deeper than {MAX_HEADER_DEPTH} levels")
        size = 5
        if kind is list:
            for item in value:
                size += _header_value_size(key, item, depth + 1)
            return size
        for name, item in value.items():
            if type(name) is not str:
                raise UnmappableRow(f"header {key!r}: table names must be strings")
            length = _utf8_len(name)
            if length > MAX_NESTED_KEY_BYTES:
                raise UnmappableRow(
                    f"header {key!r}: nested name longer than {MAX_NESTED_KEY_BYTES} bytes:"
                    f" {name[:40]!r}..."
                )
            size += 1 + length + _header_value_size(key, item, depth + 1)
        return size
    raise UnmappableRow(f"header {key!r}: {kind.__name__} is not a JSON value")


def read_headers(row: OutboxRow) -> dict[str, Any]:
    raw = row.headers
    if raw is None or raw == b"{}":
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UnmappableRow(f"headers are not valid JSON (or nested too deep): {exc}") from None
    if not isinstance(value, dict):
        raise UnmappableRow(f"headers must be a JSON object, got {type(value).__name__}")
    check_headers(value)
    if any(_holds_float(item) for item in value.values()):
        _check_exact_numbers(raw)
    return value


def _holds_float(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        return any(_holds_float(item) for item in value.values())
    if kind is list:
        return any(_holds_float(item) for item in value)
    return False


def _check_exact_numbers(raw: bytes) -> None:
    """Refuse a JSON number that a double would change: orjson silently turned
    ``-9223372036854775809`` into ``-9.223372036854776e+18``.

    The rule: the double, printed in its shortest form (``repr``), must be the
    number the JSON text wrote. That keeps ``0.1``, ``1.5`` and ``1e3`` (every
    JSON reader maps them to the same double, and printing it gives them back)
    and refuses only numbers that arrive as another number, such as
    ``9007199254740993.0`` or ``1e-400``. "The text's exact decimal equals the
    double" would refuse ``0.1`` and nearly every fraction. Integers that
    orjson read as doubles (outside 64 bits) meet the int64 rule instead. Only
    headers holding a float are parsed a second time, exactly.
    """
    exact = json.loads(raw, parse_float=Decimal)
    for key, value in exact.items():
        _check_exact(key, value)


def _check_exact(key: str, value: Any) -> None:
    kind = type(value)
    if kind is Decimal:
        double = float(value)
        if Decimal(repr(double)) != value:
            raise UnmappableRow(
                f"header {key!r}: number {value} has no exact double (it would arrive as"
                f" {double!r})"
            )
    elif kind is int:
        _header_value_size(key, value, 1)  # the int64 rule, with its message
    elif kind is dict:
        for item in value.values():
            _check_exact(key, item)
    elif kind is list:
        for item in value:
            _check_exact(key, item)


def check_short_string(what: str, value: str) -> None:
    # Cheap on the hot path: a UTF-8 character is at most 4 bytes.
    if len(value) > MAX_SHORT_STRING_BYTES // 4 and len(value.encode()) > MAX_SHORT_STRING_BYTES:
        raise UnmappableRow(f"{what} longer than {MAX_SHORT_STRING_BYTES} bytes: {value[:40]!r}...")


def check_header_value(key: str, value: Any) -> None:
    """Raise UnmappableRow for a JSON value that an AMQP field table cannot hold."""
    _header_value_size(key, value, 1)


def check_routing_key_size(routing_key: str) -> None:
    if len(routing_key.encode()) > MAX_ROUTING_KEY_BYTES:
        raise UnmappableRow(f"routing key longer than {MAX_ROUTING_KEY_BYTES} bytes")

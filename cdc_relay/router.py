"""Outbox row -> AMQP envelope: the message mapping of DESIGN.md §4.

Pure: no I/O. Text values arrive as raw UTF-8 bytes from the decoder; the
payload (jsonb text) becomes the body as is, without parsing or re-encoding.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

APP_ID = "cdc-relay"
MAX_ROUTING_KEY_BYTES = 255
# AMQP 0-9-1 exchange-name domain; anything else the broker refuses with a
# channel error, which would stall the stream instead of dead-lettering the row.
EXCHANGE_NAME = re.compile(r"^[a-zA-Z0-9\-_.:]{0,127}\Z")  # \Z: "$" lets "x\n" through
MAX_SHORT_STRING_BYTES = 255  # message_id, type, header names: AMQP short strings
# Header values the publisher can encode: AMQP signed 64-bit integers and pamqp's
# 32-bit float. A value outside these would fail every publish of the row, forever.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = 3.4028234663852886e38
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
OUTBOX_COLUMNS = (
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "exchange",
    "routing_key",
    "created_at",
)
REQUIRED_COLUMNS = ("id", "aggregate_type", "aggregate_id", "event_type", "payload")
FORMATS = ("event", "celery")


class UnmappableRow(ValueError):
    """This row can never become a message (bad template value, bad headers...)."""


class OutboxSchemaError(ValueError):
    """The replicated table does not look like an outbox table."""


@dataclass(slots=True)
class OutboxRow:
    """One outbox insert, values still as the text Postgres sent."""

    id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: bytes
    headers: bytes | None = None
    exchange: str | None = None
    routing_key: str | None = None
    created_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for dead letters and logs)."""
        return {
            "id": self.id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "event_type": self.event_type,
            "payload": self.payload.decode("utf-8", "replace"),
            "headers": None if self.headers is None else self.headers.decode("utf-8", "replace"),
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "created_at": self.created_at,
        }


class RowReader:
    """Maps an Insert's value tuple to an OutboxRow, for one Relation's column order."""

    __slots__ = ("_indexes",)

    def __init__(self, column_names: list[str] | tuple[str, ...]) -> None:
        positions = {name: i for i, name in enumerate(column_names)}
        missing = [c for c in REQUIRED_COLUMNS if c not in positions]
        if missing:
            raise OutboxSchemaError(f"outbox table lacks column(s): {', '.join(missing)}")
        self._indexes = tuple(positions.get(name) for name in OUTBOX_COLUMNS)

    def read(self, values: tuple[Any, ...]) -> OutboxRow:
        i_id, i_at, i_aid, i_et, i_pl, i_hd, i_ex, i_rk, i_ca = self._indexes
        try:
            return OutboxRow(
                _text(values[i_id]),  # type: ignore[index]
                _text(values[i_at]),  # type: ignore[index]
                _text(values[i_aid]),  # type: ignore[index]
                _text(values[i_et]),  # type: ignore[index]
                _raw(values[i_pl]),  # type: ignore[index]
                None if i_hd is None else _raw_or_none(values[i_hd]),
                None if i_ex is None else _text_or_none(values[i_ex]),
                None if i_rk is None else _text_or_none(values[i_rk]),
                None if i_ca is None else _text_or_none(values[i_ca]),
            )
        except (TypeError, UnicodeDecodeError, IndexError) as exc:
            raise UnmappableRow(f"cannot read outbox row: {exc}") from None


def _raw(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    raise TypeError(f"expected a text value, got {value!r}")


def _raw_or_none(value: Any) -> bytes | None:
    return None if value is None else _raw(value)


def _text(value: Any) -> str:
    return _raw(value).decode()


def _text_or_none(value: Any) -> str | None:
    return None if value is None else _raw(value).decode()


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


class _TemplateValues(dict[str, Any]):
    """format_map source that parses the payload only when the template asks for it."""

    def __init__(self, row: OutboxRow) -> None:
        super().__init__(
            id=row.id,
            aggregate_type=row.aggregate_type,
            aggregate_id=row.aggregate_id,
            event_type=row.event_type,
        )
        self._row = row

    def __missing__(self, key: str) -> Any:
        if key == "payload":
            value = orjson.loads(self._row.payload)
            self["payload"] = value
            return value
        raise UnmappableRow(f"routing-key template refers to unknown field {{{key}}}")


class Router:
    """Turns outbox rows into envelopes with the relay's configured defaults."""

    def __init__(
        self,
        exchange: str = "outbox",
        routing_key_template: str = "{aggregate_type}.{event_type}",
        message_format: str = "event",
    ) -> None:
        if message_format not in FORMATS:
            raise ValueError(f"unknown message format {message_format!r}; use one of {FORMATS}")
        fields = [f for _, f, _, _ in string.Formatter().parse(routing_key_template) if f]
        self.exchange = exchange
        self.routing_key_template = routing_key_template
        self.message_format = message_format
        # The default template is so common that it gets a fast path.
        self._fast_template = fields == ["aggregate_type", "event_type"] and (
            routing_key_template == "{aggregate_type}.{event_type}"
        )

    def route(self, row: OutboxRow) -> Envelope:
        headers = _headers(row)
        if self.message_format == "celery":
            return _celery_envelope(row, headers)
        routing_key = row.routing_key
        if routing_key is None:
            routing_key = self.render_routing_key(row)
        _check_routing_key(routing_key)
        _check_short_string("id", row.id)
        _check_short_string("event_type", row.event_type)
        headers["aggregate_type"] = row.aggregate_type
        headers["aggregate_id"] = row.aggregate_id
        headers["event_type"] = row.event_type
        exchange = self.exchange if row.exchange is None else row.exchange
        if row.exchange is not None and not EXCHANGE_NAME.match(exchange):
            raise UnmappableRow(f"invalid exchange name {exchange[:140]!r}")
        return Envelope(
            exchange=exchange,
            routing_key=routing_key,
            body=row.payload,
            message_id=row.id,
            type=row.event_type,
            headers=headers,
            timestamp=parse_timestamptz(row.created_at),
        )

    def render_routing_key(self, row: OutboxRow) -> str:
        if self._fast_template:
            return f"{row.aggregate_type}.{row.event_type}"
        try:
            return self.routing_key_template.format_map(_TemplateValues(row))
        except UnmappableRow:
            raise
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
            raise UnmappableRow(
                f"routing-key template {self.routing_key_template!r} cannot be rendered: "
                f"{type(exc).__name__}: {exc}"
            ) from None


def _headers(row: OutboxRow) -> dict[str, Any]:
    raw = row.headers
    if raw is None or raw == b"{}":
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UnmappableRow(f"headers are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UnmappableRow(f"headers must be a JSON object, got {type(value).__name__}")
    for key, item in value.items():
        if len(key) > MAX_SHORT_STRING_BYTES // 4:
            _check_short_string("header name", key)
        _check_header_value(key, item)
    return value


def _check_short_string(what: str, value: str) -> None:
    # Cheap on the hot path: a UTF-8 character is at most 4 bytes.
    if len(value) > MAX_SHORT_STRING_BYTES // 4 and len(value.encode()) > MAX_SHORT_STRING_BYTES:
        raise UnmappableRow(f"{what} longer than {MAX_SHORT_STRING_BYTES} bytes: {value[:40]!r}...")


def _check_header_value(key: str, value: Any) -> None:
    """Raise UnmappableRow for a JSON value that an AMQP field table cannot hold."""
    kind = type(value)
    if kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise UnmappableRow(f"header {key!r}: integer {value} does not fit AMQP's int64")
    elif kind is float:
        if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
            raise UnmappableRow(f"header {key!r}: number {value} does not fit an AMQP float")
    elif kind is dict:
        for item in value.values():
            _check_header_value(key, item)
    elif kind is list:
        for item in value:
            _check_header_value(key, item)


def _check_routing_key(routing_key: str) -> None:
    if len(routing_key.encode()) > MAX_ROUTING_KEY_BYTES:
        raise UnmappableRow(f"routing key longer than {MAX_ROUTING_KEY_BYTES} bytes")


def _celery_envelope(row: OutboxRow, headers: dict[str, Any]) -> Envelope:
    """A Celery task message (protocol 2) from an outbox row.

    event_type is the task name, payload is ``{"args": [...], "kwargs": {...}}``,
    routing_key (row or default ``celery``) is the queue, exchange defaults to
    the direct default exchange ``""`` unless the row names one. The outbox id
    becomes the task id, so a redelivered task keeps its identity.
    """
    try:
        payload = orjson.loads(row.payload)
    except orjson.JSONDecodeError as exc:
        raise UnmappableRow(f"celery payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise UnmappableRow("celery payload must be an object with args/kwargs")
    args = payload.get("args", [])
    kwargs = payload.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise UnmappableRow("celery payload needs args (array) and kwargs (object)")
    task_id = row.id
    _check_short_string("id", task_id)
    _check_header_value("eta", payload.get("eta"))
    _check_header_value("expires", payload.get("expires"))
    celery_headers: dict[str, Any] = {
        "lang": "py",
        "task": row.event_type,
        "id": task_id,
        "shadow": None,
        "eta": payload.get("eta"),
        "expires": payload.get("expires"),
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(tuple(args)),
        "kwargsrepr": repr(kwargs),
        "origin": APP_ID,
        "ignore_result": False,
    }
    celery_headers.update(headers)
    body = orjson.dumps(
        [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    if row.exchange is not None and not EXCHANGE_NAME.match(row.exchange):
        raise UnmappableRow(f"invalid exchange name {row.exchange[:140]!r}")
    routing_key = row.routing_key or "celery"
    _check_routing_key(routing_key)
    return Envelope(
        exchange=row.exchange if row.exchange is not None else "",
        routing_key=routing_key,
        body=body,
        message_id=task_id,
        type=None,
        headers=celery_headers,
        timestamp=parse_timestamptz(row.created_at),
        content_encoding="utf-8",
        correlation_id=task_id,
    )

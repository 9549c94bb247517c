"""Outbox row -> AMQP envelope: the message mapping of DESIGN.md §4.

Pure: no I/O. Text values arrive as raw UTF-8 bytes from the decoder; the
payload (jsonb text) becomes the body as is, without parsing or re-encoding.

The checks here are the one rule for "can the relay ever publish this?": the
relay dead-letters a row that fails them, and ``cdc_relay.outbox`` runs the same
checks at enqueue time so the application hears about it while it can still
fix the call.
"""

from __future__ import annotations

import fnmatch
import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from cdc_relay.schema import OUTBOX_COLUMNS

if TYPE_CHECKING:
    from cdc_relay.config import Settings

APP_ID = "cdc-relay"
MAX_ROUTING_KEY_BYTES = 255
# AMQP 0-9-1 exchange-name domain; anything else the broker refuses with a
# channel error, which would stall the stream instead of dead-lettering the row.
EXCHANGE_NAME = re.compile(r"^[a-zA-Z0-9\-_.:]{0,127}\Z")  # \Z: "$" lets "x\n" through
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
# Celery's own default for argsrepr/kwargsrepr (app.amqp.argsrepr_maxsize).
CELERY_REPR_MAXSIZE = 1024
CELERY_REPR_MAXLEVELS = 3  # Celery's task_repr_maxlevels default
# A row with this aggregate_type is a Celery task in the default "event" format:
# one outbox, one slot and one relay carry events and tasks (docs/guides/celery.md).
TASK_AGGREGATE_TYPE = "celery.task"
# Names RabbitMQ reads as sender-selected distribution: a row could route copies
# to any queue the relay may write to, so they are refused unless allowed.
SENDER_SELECTED_HEADERS = ("CC", "BCC")
# How --allowed-exchanges names the default exchange "" (every queue by its name):
# no glob matches it, so a list of named exchanges never lets a row reach any queue.
DEFAULT_EXCHANGE_PATTERN = "(default)"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
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


class MissingColumns:
    """Reads no row: the outbox lacked required columns when these rows were written.

    Stands in for a RowReader after DDL while streaming. pgoutput describes a row
    with the table as it was then, on every replay, so refusing the stream would
    block it for good even after the columns are back; each such row is a dead
    letter instead (startup validation still refuses a table that lacks them now).
    """

    __slots__ = ("columns", "reason")

    def __init__(self, columns: tuple[str, ...], reason: str) -> None:
        self.columns = columns
        self.reason = reason

    def read(self, values: tuple[Any, ...]) -> OutboxRow:
        raise UnmappableRow(self.reason)


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
    priority: int | None = None


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


class _AnyPayload:
    """Stands in for any payload when a template is checked without a real row."""

    def __getitem__(self, key: object) -> _AnyPayload:
        return self

    def __format__(self, spec: str) -> str:
        return format("x", spec)


def _check_format_spec(template: str, spec: str) -> None:
    """Refuse a width or precision over MAX_ROUTING_KEY_BYTES, and nested fields in a spec.

    ``{id!r:>99999999999}`` died with a MemoryError while rendering; no key
    longer than 255 bytes can be published anyway, so a larger number is a
    mistake. A nested field (``{id:>{aggregate_id}}``) would take the width
    from each row, so it is refused too.
    """
    if "{" in spec or "}" in spec:
        raise ValueError(
            f"invalid routing-key template {template!r}: a format spec cannot hold a field"
        )
    for number in re.findall(r"\d+", spec):
        if int(number) > MAX_ROUTING_KEY_BYTES:
            raise ValueError(
                f"invalid routing-key template {template!r}: width or precision {number} "
                f"over {MAX_ROUTING_KEY_BYTES} (the longest routing key)"
            )


class Router:
    """Turns outbox rows into envelopes with the relay's configured defaults.

    The one publishing policy of every command that publishes (``run``,
    ``resync``, ``dead-letters replay``): ``allowed_exchanges`` (see
    ``exchange_allowed``; empty = any) bounds the exchange each message actually
    goes to, after defaults, the default exchange ``""`` of a Celery task
    included; ``CC``/``BCC`` headers are refused unless ``allow_cc_headers``;
    a body over ``max_message_size`` (None: no limit) is refused.
    """

    def __init__(
        self,
        exchange: str = "outbox",
        routing_key_template: str = "{aggregate_type}.{event_type}",
        message_format: str = "event",
        allowed_exchanges: Sequence[str] = (),
        allow_cc_headers: bool = False,
        max_message_size: int | None = None,
    ) -> None:
        if message_format not in FORMATS:
            raise ValueError(f"unknown message format {message_format!r}; use one of {FORMATS}")
        try:
            parsed = list(string.Formatter().parse(routing_key_template))
        except ValueError as exc:
            raise ValueError(
                f"invalid routing-key template {routing_key_template!r}: {exc}"
            ) from None
        for _, field, spec, _ in parsed:
            if field is not None and spec:
                _check_format_spec(routing_key_template, spec)
        fields = [f for _, f, _, _ in parsed if f]
        self.exchange = exchange
        self.routing_key_template = routing_key_template
        self.message_format = message_format
        self.allowed_exchanges = tuple(allowed_exchanges)
        self.allow_cc_headers = allow_cc_headers
        self.max_message_size = max_message_size
        # The default template is so common that it gets a fast path.
        self._fast_template = fields == ["aggregate_type", "event_type"] and (
            routing_key_template == "{aggregate_type}.{event_type}"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        """The relay's router: one place that turns settings into mapping rules."""
        return cls(
            settings.exchange,
            settings.routing_key,
            settings.message_format,
            allowed_exchanges=settings.allowed_exchanges,
            allow_cc_headers=settings.allow_cc_headers,
            max_message_size=settings.max_message_size,
        )

    def route(self, row: OutboxRow) -> Envelope:
        """The envelope for this row, or UnmappableRow (one line) if the policy refuses it."""
        envelope = self._envelope(row)
        self._check_exchange(envelope.exchange)
        limit = self.max_message_size
        if limit is not None and len(envelope.body) > limit:
            raise UnmappableRow(
                f"message body of {len(envelope.body)} bytes exceeds the maximum message size "
                f"{limit} (--max-message-size or the broker's max_message_size)"
            )
        return envelope

    def _envelope(self, row: OutboxRow) -> Envelope:
        if not row.id:
            raise UnmappableRow("empty message id: consumers and returns need one")
        headers = _headers(row)
        if headers and not self.allow_cc_headers:
            _refuse_sender_selected(headers)
        if row.exchange is not None and not EXCHANGE_NAME.match(row.exchange):
            raise UnmappableRow(f"invalid exchange name {row.exchange[:140]!r}")
        if self.message_format == "celery" or row.aggregate_type == TASK_AGGREGATE_TYPE:
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
        return Envelope(
            exchange=self.exchange if row.exchange is None else row.exchange,
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
        except RecursionError:  # a {payload[...]} value nested too deep to print
            raise UnmappableRow(
                f"routing-key template {self.routing_key_template!r} cannot be rendered: "
                "the value is nested too deep"
            ) from None

    def check_template(self) -> None:
        """Render the routing-key template once, so a typo is a startup error, not N dead letters.

        Raises ValueError with one line. ``{payload[...]}`` lookups are not
        checked (they depend on each row's payload), the syntax around them is.
        """
        template = self.routing_key_template
        values: dict[str, Any] = {
            "id": "00000000-0000-4000-8000-000000000000",
            "aggregate_type": "order",
            "aggregate_id": "42",
            "event_type": "OrderCreated",
            "payload": _AnyPayload(),
        }
        try:
            parsed = list(string.Formatter().parse(template))
            for _, name, _, _ in parsed:
                if name is None:
                    continue
                root = re.split(r"[.\[]", name, maxsplit=1)[0]
                if root not in values:
                    known = ", ".join("{" + k + "}" for k in values)
                    raise ValueError(f"unknown field {{{name}}}; use {known}")
            template.format_map(values)
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid routing-key template {template!r}: {exc}") from None

    def _check_exchange(self, exchange: str) -> None:
        if not exchange_allowed(self.allowed_exchanges, exchange):
            allowed = ", ".join(self.allowed_exchanges)
            what = "the default exchange ''" if exchange == "" else f"exchange {exchange!r}"
            hint = f"; list {DEFAULT_EXCHANGE_PATTERN} to allow it" if exchange == "" else ""
            raise UnmappableRow(f"{what} is not allowed (allowed: {allowed}){hint}")


def exchange_allowed(patterns: Sequence[str], exchange: str) -> bool:
    """May a message go to ``exchange`` under ``--allowed-exchanges`` ``patterns``?

    Empty: any exchange. Otherwise case-sensitive glob patterns (as exchange
    names are); the default exchange ``""`` matches only the pattern
    ``(default)``, never a glob: ``*`` means every named exchange, and a
    Celery task without an exchange must not reach any queue by name unless
    the operator said so.
    """
    if not patterns:
        return True
    if exchange == "":
        return DEFAULT_EXCHANGE_PATTERN in patterns
    return any(fnmatch.fnmatchcase(exchange, p) for p in patterns)


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
            _check_short_string("header name", key)
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


def _headers(row: OutboxRow) -> dict[str, Any]:
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


def _refuse_sender_selected(headers: dict[str, Any]) -> None:
    for name in SENDER_SELECTED_HEADERS:
        if name in headers:
            raise UnmappableRow(
                f"header {name!r} selects extra destinations (sender-selected distribution);"
                " the relay refuses it unless CC/BCC headers are allowed"
            )


def _check_short_string(what: str, value: str) -> None:
    # Cheap on the hot path: a UTF-8 character is at most 4 bytes.
    if len(value) > MAX_SHORT_STRING_BYTES // 4 and len(value.encode()) > MAX_SHORT_STRING_BYTES:
        raise UnmappableRow(f"{what} longer than {MAX_SHORT_STRING_BYTES} bytes: {value[:40]!r}...")


def _check_header_value(key: str, value: Any) -> None:
    """Raise UnmappableRow for a JSON value that an AMQP field table cannot hold."""
    _header_value_size(key, value, 1)


def _check_routing_key(routing_key: str) -> None:
    if len(routing_key.encode()) > MAX_ROUTING_KEY_BYTES:
        raise UnmappableRow(f"routing key longer than {MAX_ROUTING_KEY_BYTES} bytes")


def celery_repr(value: Iterable[Any] | dict[str, Any]) -> str:
    """argsrepr/kwargsrepr exactly as Celery makes them: saferepr, 1024 chars, 3 levels.

    Truncated so a big argument cannot push the header block past frame_max.
    Without Celery installed (a relay that only forwards), reprlib gives the
    same bounds.
    """
    try:
        from celery.utils.saferepr import saferepr
    except ImportError:  # pragma: no cover - Celery is a test dependency
        return _fallback_repr(value)
    return str(saferepr(value, CELERY_REPR_MAXSIZE, maxlevels=CELERY_REPR_MAXLEVELS))


def _fallback_repr(value: Any) -> str:
    import reprlib

    short = reprlib.Repr()
    short.maxlevel = CELERY_REPR_MAXLEVELS
    short.maxstring = CELERY_REPR_MAXSIZE
    text = short.repr(value)
    return text if len(text) <= CELERY_REPR_MAXSIZE else text[: CELERY_REPR_MAXSIZE - 3] + "..."


def _is_iso8601(value: Any) -> bool:
    """What the worker can parse; anything else would fail the task on every delivery."""
    if type(value) is not str:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _celery_envelope(row: OutboxRow, headers: dict[str, Any]) -> Envelope:
    """A Celery task message (protocol 2) from an outbox row.

    event_type is the task name, payload is ``{"args": [...], "kwargs": {...}}``
    plus optional ``eta``/``expires`` (ISO 8601), ``priority`` (0-255),
    ``root_id``/``parent_id``; routing_key (row or default ``celery``) is the
    queue, exchange defaults to the direct default exchange ``""`` unless the
    row names one (Celery's own choice for a direct queue). The outbox id
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
    eta, expires = payload.get("eta"), payload.get("expires")
    for name, value in (("eta", eta), ("expires", expires)):
        _check_header_value(name, value)
        if value is not None and not _is_iso8601(value):
            raise UnmappableRow(
                f"celery header {name} must be an ISO 8601 string or null: {value!r:.60}"
            )
    priority = payload.get("priority")
    if priority is not None and not (type(priority) is int and 0 <= priority <= 255):
        raise UnmappableRow(f"celery priority must be an integer 0-255, got {priority!r}")
    root_id = payload.get("root_id") or task_id
    parent_id = payload.get("parent_id")
    for name, value in (("root_id", root_id), ("parent_id", parent_id)):
        if value is not None and not isinstance(value, str):
            raise UnmappableRow(f"celery {name} must be a string, got {value!r}")
    try:
        body = orjson.dumps(
            [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        )
    except orjson.JSONEncodeError as exc:
        raise UnmappableRow(f"celery args/kwargs cannot be encoded: {exc}") from None
    celery_headers: dict[str, Any] = {
        "lang": "py",
        "task": row.event_type,
        "id": task_id,
        "shadow": None,
        "eta": eta,
        "expires": expires,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": root_id,
        "parent_id": parent_id,
        "argsrepr": celery_repr(tuple(args)),
        "kwargsrepr": celery_repr(kwargs),
        "origin": APP_ID,
        "ignore_result": False,
    }
    celery_headers.update(headers)
    check_headers(celery_headers)
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
        priority=priority,
    )

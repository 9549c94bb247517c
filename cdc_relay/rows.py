"""The outbox row as the relay reads it: its columns, its values, and why it can be refused.

Pure: no I/O. Text values arrive as raw UTF-8 bytes from the decoder; a row
keeps them as they came (the payload stays bytes), so reading a row costs
one decode per text column and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from cdc_relay.layout import Layout

# Every column of the outbox, in table order: init creates them (cdc_relay.schema),
# validation requires each by name, the reader takes them from pgoutput's tuples.
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
    # Read only from a mapped layout (cdc_relay.layout): the W3C trace context column,
    # --header-column values by header name, AMQP properties from mapped columns.
    trace_context: str | None = None
    column_headers: dict[str, Any] | None = None
    properties: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (for dead letters and logs); mapped extras only when set."""
        data: dict[str, Any] = {
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
        if self.trace_context is not None:
            data["trace_context"] = self.trace_context
        if self.column_headers is not None:
            data["column_headers"] = self.column_headers
        if self.properties is not None:
            data["properties"] = self.properties
        return data


# Type OIDs whose text a header value keeps the JSON type of (else: a string), and bytea.
BOOL_OID, BYTEA_OID, INT8_OID, INT2_OID, INT4_OID = 16, 17, 20, 21, 23
JSON_OID, JSONB_OID = 114, 3802
_INTEGER_OIDS = frozenset({INT2_OID, INT4_OID, INT8_OID})


class RowReader:
    """Maps an Insert's value tuple to an OutboxRow, for one Relation's column order.

    ``layout`` (``cdc_relay.layout``; None: ours) says which column holds each
    field; it is resolved here once into a tuple of indexes, so reading a row
    costs the same whatever the columns are called. ``type_oids`` (the
    Relation's, or the catalog's for text-selected rows) matter only for a
    mapped layout: a bytea payload is unhexed, and header columns keep the
    JSON type of integers, booleans and json values.
    """

    __slots__ = ("_extras", "_indexes", "columns")

    def __init__(
        self,
        column_names: list[str] | tuple[str, ...],
        layout: Layout | None = None,
        type_oids: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        self.columns = tuple(column_names)  # the relation's, for the dead letter of a bad row
        positions = {name: i for i, name in enumerate(column_names)}
        columns = dict(layout.columns) if layout is not None else {c: c for c in OUTBOX_COLUMNS}
        missing = [columns[c] for c in REQUIRED_COLUMNS if columns[c] not in positions]
        if missing:
            raise OutboxSchemaError(f"outbox table lacks column(s): {', '.join(missing)}")
        self._indexes = tuple(
            None if (c := columns.get(name)) is None else positions.get(c)
            for name in OUTBOX_COLUMNS
        )
        self._extras: _Extras | None = None
        if layout is not None and not layout.is_default:
            self._extras = _extras(layout, positions, type_oids)

    def read(self, values: tuple[Any, ...]) -> OutboxRow:
        # The required indexes are never None (checked in __init__); the ignores below
        # say so to mypy without a per-row assert on this hot path.
        i_id, i_at, i_aid, i_et, i_pl, i_hd, i_ex, i_rk, i_ca = self._indexes
        try:
            row = OutboxRow(
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
            if self._extras is not None:
                self._extras.fill(row, values)
        except (TypeError, UnicodeDecodeError, IndexError, ValueError) as exc:
            raise UnmappableRow(f"cannot read outbox row: {self._why(values, exc)}") from None
        return row

    def _why(self, values: tuple[Any, ...], exc: Exception) -> str:
        """The error, naming a required column that is NULL (a Debezium tombstone's payload)."""
        for i in self._indexes[: len(REQUIRED_COLUMNS)]:
            if i is not None and i < len(values) and values[i] is None:
                return f"column {self.columns[i]} is NULL"
        return str(exc)


@dataclass(frozen=True, slots=True)
class _Extras:
    """What a mapped layout reads beyond our columns, as indexes into the value tuple."""

    payload_bytea: bool
    trace_context: int | None
    headers: tuple[tuple[int, str, int], ...]  # (index, header name, type OID)
    properties: tuple[tuple[int, str], ...]  # (index, property name)

    def fill(self, row: OutboxRow, values: tuple[Any, ...]) -> None:
        if self.payload_bytea:
            row.payload = _unhex(row.payload)
        if self.trace_context is not None:
            row.trace_context = _text_or_none(values[self.trace_context])
        if self.headers:
            row.column_headers = {
                name: _typed(values[i], oid)
                for i, name, oid in self.headers
                if values[i] is not None
            }
        if self.properties:
            row.properties = {
                name: _text(values[i]) for i, name in self.properties if values[i] is not None
            }


def _extras(
    layout: Layout, positions: dict[str, int], type_oids: list[int] | tuple[int, ...] | None
) -> _Extras:
    from cdc_relay.layout import PROPERTY_FIELDS, TRACE_CONTEXT

    def oid(index: int) -> int:
        return 0 if type_oids is None else type_oids[index]

    columns = dict(layout.columns)
    payload = positions[columns["payload"]]
    trace = columns.get(TRACE_CONTEXT)
    return _Extras(
        payload_bytea=oid(payload) == BYTEA_OID,
        trace_context=None if trace is None else positions.get(trace),
        headers=tuple(
            (positions[c], h, oid(positions[c])) for c, h in layout.header_columns if c in positions
        ),
        properties=tuple(
            (positions[c], f) for f, c in layout.columns if f in PROPERTY_FIELDS and c in positions
        ),
    )


def _unhex(value: bytes) -> bytes:
    """bytea's text output (hex format, ``\\x...``) -> its bytes."""
    if not value.startswith(b"\\x"):
        raise ValueError("a bytea payload must arrive in hex format (bytea_output = hex)")
    return bytes.fromhex(value[2:].decode("ascii"))


def _typed(value: Any, oid: int) -> Any:
    """A header column's value: integers, booleans and json keep their JSON type."""
    text = _text(value)
    if oid in _INTEGER_OIDS:
        return int(text)
    if oid == BOOL_OID:
        return text == "t"
    if oid in (JSON_OID, JSONB_OID):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"json header column nested too deep: {exc}") from None
    return text


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


# The outbox columns as SQL text, in OUTBOX_COLUMNS order: what ``row_from_text`` takes
# (``resync`` reads the snapshot with it, ``replay`` re-reads a truncated row).
TEXT_SELECT = (
    "id::text, aggregate_type, aggregate_id, event_type, payload::text,"
    " headers::text, exchange, routing_key, created_at::text"
)


def row_from_text(values: tuple[Any, ...]) -> OutboxRow:
    """A row selected with TEXT_SELECT, as the text the stream would carry."""
    id_, agg_type, agg_id, event_type, payload, headers, exchange, routing_key, created = values
    return OutboxRow(
        id_,
        agg_type,
        agg_id,
        event_type,
        payload.encode(),
        None if headers is None else headers.encode(),
        exchange,
        routing_key,
        created,
    )

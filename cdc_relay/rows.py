"""The outbox row as the relay reads it: its columns, its values, and why it can be refused.

Pure: no I/O. Text values arrive as raw UTF-8 bytes from the decoder; a row
keeps them as they came (the payload stays bytes), so reading a row costs
one decode per text column and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        # The required indexes are never None (checked in __init__); the ignores below
        # say so to mypy without a per-row assert on this hot path.
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

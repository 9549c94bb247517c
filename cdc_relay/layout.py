"""Which column holds which field: the outbox layouts (ours, Debezium's) and column mapping.

Pure: no I/O. A ``Layout`` is built once from ``--layout``, ``--column`` and
``--header-column`` (``build_layout``, one-line ValueError for a bad spec);
``rows.RowReader`` turns it into a tuple of indexes per relation, the startup
checks and ``init --no-table`` hold a real table against it
(``check_table``), and resync and replay select its columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cdc_relay.rows import OUTBOX_COLUMNS, REQUIRED_COLUMNS

LAYOUTS = ("cdc-relay", "debezium")
DEFAULT_LAYOUT_NAME = "cdc-relay"
# The W3C trace context of a row (Debezium's ``tracingspancontext``).
TRACE_CONTEXT = "trace_context"
ROW_FIELDS = (*OUTBOX_COLUMNS, TRACE_CONTEXT)
# AMQP basic properties a row may set, from its headers (these names) or a mapped column.
PROPERTY_FIELDS = (
    "correlation_id",
    "reply_to",
    "expiration",
    "priority",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
    "user_id",
)
FIELDS = (*ROW_FIELDS, *PROPERTY_FIELDS)
# Headers the router writes itself for every event: a column cannot take their name.
RELAY_HEADERS = ("aggregate_type", "aggregate_id", "event_type")
MAX_IDENTIFIER_BYTES = 63  # Postgres' NAMEDATALEN - 1
MAX_HEADER_NAME_BYTES = 255  # an AMQP short string

# Debezium's Outbox Event Router columns (its defaults); timestamp and
# tracingspancontext are optional there, and so here.
DEBEZIUM_COLUMNS = (
    ("id", "id"),
    ("aggregate_type", "aggregatetype"),
    ("aggregate_id", "aggregateid"),
    ("event_type", "type"),
    ("payload", "payload"),
    ("created_at", "timestamp"),
    (TRACE_CONTEXT, "tracingspancontext"),
)

# Postgres base types (pg_type.typname) each field can be read from. The payload
# becomes the body as stored: bytea as its bytes, every other type as its text.
_TEXT = frozenset({"text", "varchar", "bpchar", "name"})
_INTEGER = frozenset({"int2", "int4", "int8"})
_KEY = _TEXT | _INTEGER | {"uuid", "numeric"}
FIELD_TYPES: Mapping[str, frozenset[str]] = {
    "id": _KEY,
    "aggregate_type": _TEXT,
    "aggregate_id": _KEY,
    "event_type": _TEXT,
    "payload": _TEXT | {"jsonb", "json", "bytea"},
    "headers": frozenset({"jsonb", "json"}),
    "exchange": _TEXT,
    "routing_key": _TEXT,
    "created_at": frozenset({"timestamptz", "timestamp"}),
    TRACE_CONTEXT: _TEXT,
    "priority": _TEXT | _INTEGER,
    "expiration": _TEXT | _INTEGER,
    **{name: _TEXT for name in PROPERTY_FIELDS if name not in ("priority", "expiration")},
}


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each field of an outbox row is read from.

    ``columns`` maps fields to column names; ``expected`` are the fields whose
    column must exist at startup (a renamed column would silently vanish),
    ``REQUIRED_COLUMNS`` those a row cannot be read without. ``header_columns``
    are (column, header) pairs: the column's value goes into that AMQP header.
    """

    name: str = DEFAULT_LAYOUT_NAME
    columns: tuple[tuple[str, str], ...] = tuple((c, c) for c in OUTBOX_COLUMNS)
    expected: frozenset[str] = frozenset(OUTBOX_COLUMNS)
    header_columns: tuple[tuple[str, str], ...] = ()

    @property
    def is_default(self) -> bool:
        """Our own layout, unmapped: what ``init`` creates and the relay always read."""
        return self == DEFAULT_LAYOUT

    def column_of(self, field: str) -> str | None:
        for name, column in self.columns:
            if name == field:
                return column
        return None

    def expected_columns(self) -> list[tuple[str, str]]:
        """(column, what it is for) of every column that must exist, in a stable order."""
        wanted = [(c, f) for f, c in self.columns if f in self.expected]
        wanted += [(c, f"header {h}") for c, h in self.header_columns]
        return wanted

    def check_table(self, table: str, types: Mapping[str, str], generated: Sequence[str]) -> None:
        """ValueError (one line naming the column) unless the table can be read this way.

        ``types`` maps the table's columns to their base type names; types are
        checked for a mapped layout (ours has always been checked by name only).
        A generated column is refused: logical replication leaves it out of every row.
        """
        for column, what in self.expected_columns():
            if column not in types:
                flag = "" if what.startswith("header") else f" (--column {what}=COLUMN)"
                raise ValueError(
                    f"outbox table {table} lacks column {column} for {what}{flag}; "
                    "rename the column or map it"
                )
        used = [c for c, _ in self.expected_columns()] + [c for _, c in self.columns]
        bad = sorted({c for c in used if c in generated})
        if bad:
            raise ValueError(
                f"outbox table {table} has generated column(s) {', '.join(bad)}: logical "
                "replication does not send generated columns, so the relay would never see "
                "their values; make them plain columns and set them in the INSERT"
            )
        if self.is_default:
            return
        for field, column in self.columns:
            kind = types.get(column)
            allowed = FIELD_TYPES[field]
            if kind is not None and kind not in allowed:
                raise ValueError(
                    f"column {column} of outbox table {table} is {kind}; {field} needs one of "
                    f"{', '.join(sorted(allowed))}"
                )


DEFAULT_LAYOUT = Layout()


def build_layout(
    name: str = DEFAULT_LAYOUT_NAME,
    column_specs: Sequence[str] = (),
    header_specs: Sequence[str] = (),
) -> Layout:
    """The layout of ``--layout``, ``--column FIELD=COLUMN``, ``--header-column COLUMN[:HEADER]``.

    Raises ValueError (one line) for an unknown layout or field, a spec
    without ``=``, a field given twice, a name Postgres or AMQP cannot hold.
    """
    if name == DEFAULT_LAYOUT_NAME:
        columns = dict(DEFAULT_LAYOUT.columns)
        expected = set(OUTBOX_COLUMNS)
    elif name == "debezium":
        columns = dict(DEBEZIUM_COLUMNS)
        expected = set(REQUIRED_COLUMNS)
    else:
        raise ValueError(f"unknown layout {name!r}; use one of {', '.join(LAYOUTS)}")
    seen: set[str] = set()
    for spec in column_specs:
        field, column = parse_column(spec)
        if field in seen:
            raise ValueError(f"--column {spec!r}: {field} is mapped twice")
        seen.add(field)
        columns[field] = column
        expected.add(field)
    headers = tuple(parse_header_column(spec) for spec in header_specs)
    names = [h for _, h in headers]
    for header in names:
        if names.count(header) > 1:
            raise ValueError(f"--header-column: header {header!r} is filled by two columns")
    ordered = tuple((f, columns[f]) for f in FIELDS if f in columns)
    return Layout(name, ordered, frozenset(expected), headers)


def parse_column(spec: str) -> tuple[str, str]:
    """``FIELD=COLUMN`` -> (field, column)."""
    field, sep, column = spec.partition("=")
    field, column = field.strip(), column.strip()
    if not sep or not field or not column:
        raise ValueError(f"--column {spec!r}: use FIELD=COLUMN, e.g. aggregate_type=kind")
    if field not in FIELDS:
        raise ValueError(
            f"--column {spec!r}: unknown field {field!r}; use one of {', '.join(FIELDS)}"
        )
    _check_identifier(f"--column {spec!r}", column)
    return field, column


def parse_header_column(spec: str) -> tuple[str, str]:
    """``COLUMN[:HEADER]`` -> (column, header); the header defaults to the column's name."""
    column, sep, header = spec.partition(":")
    column, header = column.strip(), header.strip()
    if not column or (sep and not header):
        raise ValueError(f"--header-column {spec!r}: use COLUMN or COLUMN:HEADER")
    _check_identifier(f"--header-column {spec!r}", column)
    header = header or column
    if len(header.encode()) > MAX_HEADER_NAME_BYTES:
        raise ValueError(f"--header-column {spec!r}: header name over 255 bytes")
    if header in RELAY_HEADERS:
        raise ValueError(
            f"--header-column {spec!r}: the relay sets header {header} itself; pick another name"
        )
    return column, header


def _check_identifier(what: str, column: str) -> None:
    if len(column.encode()) > MAX_IDENTIFIER_BYTES:
        raise ValueError(f"{what}: a Postgres column name has at most 63 bytes")
    if "\x00" in column:
        raise ValueError(f"{what}: a column name cannot hold NUL")

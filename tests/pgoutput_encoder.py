"""An independent pgoutput v1 encoder for round-trip tests.

Written from the protocol docs ("Logical Replication Message Formats"), not
from the decoder: it builds bytes with ``int.to_bytes`` instead of sharing the
decoder's ``struct`` formats, so a wrong format in one does not hide in both.
It mirrors what ``logical/proto.c`` writes, one message per call.
"""

from __future__ import annotations

from cdc_relay.pg.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Binary,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleValue,
    TypeMessage,
    Update,
)


def int8(value: int) -> bytes:
    return value.to_bytes(1, "big")


def int16(value: int) -> bytes:
    return value.to_bytes(2, "big", signed=True)


def uint32(value: int) -> bytes:
    """xids, OIDs, relids and lengths: PostgreSQL writes them as uint32."""
    return value.to_bytes(4, "big")


def int32(value: int) -> bytes:
    """Type modifiers (-1 = none)."""
    return value.to_bytes(4, "big", signed=True)


def lsn(value: int) -> bytes:
    return value.to_bytes(8, "big")


def timestamp(value: int) -> bytes:
    """µs since 2000-01-01; negative before the epoch."""
    return value.to_bytes(8, "big", signed=True)


def string(text: str) -> bytes:
    assert "\x00" not in text, "protocol strings are NUL-terminated"
    return text.encode("utf-8") + b"\x00"


def tuple_data(values: tuple[TupleValue, ...]) -> bytes:
    """TupleData: Int16 ncols, then n / u / t+len+text / b+len+binary per column."""
    parts = [int16(len(values))]
    for value in values:
        if value is None:
            parts.append(b"n")
        elif value is UNCHANGED_TOAST:
            parts.append(b"u")
        elif isinstance(value, Binary):
            parts += [b"b", uint32(len(value.data)), value.data]
        elif isinstance(value, bytes):
            parts += [b"t", uint32(len(value)), value]
        else:
            raise TypeError(f"not a tuple value: {value!r}")
    return b"".join(parts)


def encode(message: PgOutputMessage) -> bytes:
    """One pgoutput v1 message, as the payload of an XLogData frame."""
    m = message
    match m:
        case Begin():
            return b"B" + lsn(m.final_lsn) + timestamp(m.commit_ts) + uint32(m.xid)
        case Commit():
            return (
                b"C" + int8(m.flags) + lsn(m.commit_lsn) + lsn(m.end_lsn) + timestamp(m.commit_ts)
            )
        case Origin():
            return b"O" + lsn(m.commit_lsn) + string(m.name)
        case Relation():
            parts = [
                b"R",
                uint32(m.relid),
                string(m.namespace),
                string(m.name),
                m.replica_identity.encode("ascii"),
                int16(len(m.columns)),
            ]
            for c in m.columns:
                parts += [int8(c.flags), string(c.name), uint32(c.type_oid), int32(c.type_modifier)]
            return b"".join(parts)
        case TypeMessage():
            return b"Y" + uint32(m.type_oid) + string(m.namespace) + string(m.name)
        case Insert():
            return b"I" + uint32(m.relid) + b"N" + tuple_data(m.new)
        case Update():
            old = b""
            if m.old is not None:
                assert m.old_kind in ("K", "O")
                old = m.old_kind.encode("ascii") + tuple_data(m.old)
            return b"U" + uint32(m.relid) + old + b"N" + tuple_data(m.new)
        case Delete():
            assert m.old_kind in ("K", "O")
            return b"D" + uint32(m.relid) + m.old_kind.encode("ascii") + tuple_data(m.old)
        case Truncate():
            relids = b"".join(uint32(relid) for relid in m.relids)
            return b"T" + uint32(len(m.relids)) + int8(m.options) + relids
        case LogicalMessage():
            return (
                b"M"
                + int8(1 if m.transactional else 0)
                + lsn(m.lsn)
                + string(m.prefix)
                + uint32(len(m.content))
                + m.content
            )
    raise TypeError(f"cannot encode {m!r}")

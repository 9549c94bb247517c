"""An independent pgoutput v1 encoder, written from the protocol docs, for round trips."""

from __future__ import annotations

import struct

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


def cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def tuple_data(values: tuple[TupleValue, ...]) -> bytes:
    out = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(value, Binary):
            out.append(b"b" + struct.pack("!I", len(value.data)) + value.data)
        else:
            assert isinstance(value, bytes)
            out.append(b"t" + struct.pack("!I", len(value)) + value)
    return b"".join(out)


def encode(message: PgOutputMessage) -> bytes:
    m = message
    if isinstance(m, Begin):
        return b"B" + struct.pack("!QqI", m.final_lsn, m.commit_ts, m.xid)
    if isinstance(m, Commit):
        return b"C" + struct.pack("!BQQq", m.flags, m.commit_lsn, m.end_lsn, m.commit_ts)
    if isinstance(m, Origin):
        return b"O" + struct.pack("!Q", m.commit_lsn) + cstring(m.name)
    if isinstance(m, Relation):
        out = b"R" + struct.pack("!I", m.relid) + cstring(m.namespace) + cstring(m.name)
        out += m.replica_identity.encode() + struct.pack("!h", len(m.columns))
        for c in m.columns:
            out += (
                bytes([c.flags]) + cstring(c.name) + struct.pack("!Ii", c.type_oid, c.type_modifier)
            )
        return out
    if isinstance(m, TypeMessage):
        return b"Y" + struct.pack("!I", m.type_oid) + cstring(m.namespace) + cstring(m.name)
    if isinstance(m, Insert):
        return b"I" + struct.pack("!I", m.relid) + b"N" + tuple_data(m.new)
    if isinstance(m, Update):
        out = b"U" + struct.pack("!I", m.relid)
        if m.old is not None:
            assert m.old_kind is not None
            out += m.old_kind.encode() + tuple_data(m.old)
        return out + b"N" + tuple_data(m.new)
    if isinstance(m, Delete):
        return b"D" + struct.pack("!I", m.relid) + m.old_kind.encode() + tuple_data(m.old)
    if isinstance(m, Truncate):
        return (
            b"T"
            + struct.pack("!IB", len(m.relids), m.options)
            + b"".join(struct.pack("!I", r) for r in m.relids)
        )
    if isinstance(m, LogicalMessage):
        return (
            b"M"
            + struct.pack("!BQ", 1 if m.transactional else 0, m.lsn)
            + cstring(m.prefix)
            + struct.pack("!I", len(m.content))
            + m.content
        )
    raise TypeError(f"cannot encode {m!r}")


def xlogdata(data_start: int, wal_end: int, send_time: int, payload: bytes) -> bytes:
    return b"w" + struct.pack("!QQq", data_start, wal_end, send_time) + payload


def keepalive(wal_end: int, send_time: int, reply: bool) -> bytes:
    return b"k" + struct.pack("!Qq?", wal_end, send_time, reply)

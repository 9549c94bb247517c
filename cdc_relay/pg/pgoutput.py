"""Decode pgoutput (proto_version 1) and the CopyData wrappers around it.

Pure functions over bytes, no I/O: the replication connection hands frames in,
message objects come out. Layouts follow PostgreSQL's protocol docs and
``logical/proto.c``; all integers are network byte order, LSNs are uint64,
xids and OIDs uint32. Text column values stay raw UTF-8 bytes so the outbox
payload can become the message body without a decode/encode round trip.
Anything malformed or unknown raises ProtocolError: skipping a message we do
not understand could skip an outbox row.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 UTC in Unix microseconds
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class ProtocolError(ValueError):
    """Bytes that are not a valid message of the protocol we speak."""


class _Unchanged(enum.Enum):
    UNCHANGED_TOAST = "u"

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = _Unchanged.UNCHANGED_TOAST


@dataclass(slots=True, frozen=True)
class Binary:
    """A column value in binary (send/recv) format; never confused with text bytes."""

    data: bytes


TupleValue = bytes | None | _Unchanged | Binary


# -- CopyData wrappers --------------------------------------------------------


@dataclass(slots=True, frozen=True)
class XLogData:
    data_start: int
    wal_end: int
    send_time: int
    payload: bytes


@dataclass(slots=True, frozen=True)
class PrimaryKeepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


_XLOG_HEADER = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STANDBY_STATUS = struct.Struct("!cQQQqB")


def decode_copy_data(data: bytes) -> XLogData | PrimaryKeepalive:
    """One CopyData frame of the replication stream."""
    if not data:
        raise ProtocolError("empty CopyData frame")
    tag = data[0]
    if tag == 0x77:  # 'w'
        if len(data) < 25:
            raise ProtocolError(f"XLogData frame too short ({len(data)} bytes)")
        start, end, sent = _XLOG_HEADER.unpack_from(data, 1)
        return XLogData(start, end, sent, data[25:])
    if tag == 0x6B:  # 'k'
        if len(data) != 18:
            raise ProtocolError(f"keepalive frame of {len(data)} bytes, expected 18")
        wal_end, sent, reply = _KEEPALIVE.unpack_from(data, 1)
        return PrimaryKeepalive(wal_end, sent, reply)
    raise ProtocolError(f"unknown CopyData message type {chr(tag)!r}")


def encode_standby_status(
    write: int, flush: int, apply: int, client_time: int, reply_requested: bool = False
) -> bytes:
    """Standby status update ('r'): positions are 'last byte + 1'."""
    return _STANDBY_STATUS.pack(b"r", write, flush, apply, client_time, 1 if reply_requested else 0)


def pg_now_us() -> int:
    return time.time_ns() // 1000 - PG_EPOCH_US


def pg_time_to_datetime(us: int) -> datetime:
    return _PG_EPOCH + timedelta(microseconds=us)


# -- pgoutput messages ---------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(slots=True, frozen=True)
class Begin:
    final_lsn: int
    commit_ts: int
    xid: int


@dataclass(slots=True, frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int


@dataclass(slots=True, frozen=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(slots=True, frozen=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(slots=True, frozen=True)
class TypeMessage:
    type_oid: int
    namespace: str
    name: str


@dataclass(slots=True, frozen=True)
class Insert:
    relid: int
    new: tuple[TupleValue, ...]


@dataclass(slots=True, frozen=True)
class Update:
    relid: int
    old: tuple[TupleValue, ...] | None
    old_kind: str | None
    new: tuple[TupleValue, ...]


@dataclass(slots=True, frozen=True)
class Delete:
    relid: int
    old: tuple[TupleValue, ...]
    old_kind: str


@dataclass(slots=True, frozen=True)
class Truncate:
    options: int
    relids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(slots=True, frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMessage
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)

_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_RELATION_HEAD = struct.Struct("!I")
_COLUMN_TAIL = struct.Struct("!Ii")
_TRUNCATE_HEAD = struct.Struct("!IB")
_MESSAGE_HEAD = struct.Struct("!BQ")
_UNSUPPORTED = {
    ord("S"): "Stream Start",
    ord("E"): "Stream Stop",
    ord("c"): "Stream Commit",
    ord("A"): "Stream Abort",
    ord("b"): "Begin Prepare",
    ord("P"): "Prepare",
    ord("K"): "Commit Prepared",
    ord("r"): "Rollback Prepared",
    ord("p"): "Stream Prepare",
}


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"string is not UTF-8: {exc}") from None


def _tuple(buf: bytes, pos: int) -> tuple[tuple[TupleValue, ...], int]:
    (ncols,) = _I16.unpack_from(buf, pos)
    if ncols < 0:
        raise ProtocolError(f"negative column count {ncols}")
    pos += 2
    values: list[TupleValue] = []
    append = values.append
    size = len(buf)
    for _ in range(ncols):
        if pos >= size:
            raise ProtocolError("tuple data truncated")
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't'
            (length,) = _U32.unpack_from(buf, pos)
            pos += 4
            end = pos + length
            if end > size:
                raise ProtocolError("column value truncated")
            append(buf[pos:end])
            pos = end
        elif kind == 0x6E:  # 'n'
            append(None)
        elif kind == 0x75:  # 'u'
            append(UNCHANGED_TOAST)
        elif kind == 0x62:  # 'b'
            (length,) = _U32.unpack_from(buf, pos)
            pos += 4
            end = pos + length
            if end > size:
                raise ProtocolError("column value truncated")
            append(Binary(buf[pos:end]))
            pos = end
        else:
            raise ProtocolError(f"unknown tuple value kind {chr(kind)!r}")
    return tuple(values), pos


def _expect_end(buf: bytes, pos: int, what: str) -> None:
    if pos != len(buf):
        raise ProtocolError(f"{len(buf) - pos} trailing byte(s) after {what}")


def _decode_insert(buf: bytes) -> Insert:
    (relid,) = _U32.unpack_from(buf, 1)
    if buf[5] != 0x4E:  # 'N'
        raise ProtocolError(f"Insert without new tuple marker, got {chr(buf[5])!r}")
    values, pos = _tuple(buf, 6)
    _expect_end(buf, pos, "Insert")
    return Insert(relid, values)


def _decode_begin(buf: bytes) -> Begin:
    if len(buf) != 21:
        raise ProtocolError(f"Begin of {len(buf)} bytes, expected 21")
    return Begin(*_BEGIN.unpack_from(buf, 1))


def _decode_commit(buf: bytes) -> Commit:
    if len(buf) != 26:
        raise ProtocolError(f"Commit of {len(buf)} bytes, expected 26")
    return Commit(*_COMMIT.unpack_from(buf, 1))


def _decode_origin(buf: bytes) -> Origin:
    (lsn,) = _U64.unpack_from(buf, 1)
    name, pos = _string(buf, 9)
    _expect_end(buf, pos, "Origin")
    return Origin(lsn, name)


def _decode_relation(buf: bytes) -> Relation:
    (relid,) = _RELATION_HEAD.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    if pos + 3 > len(buf):
        raise ProtocolError("Relation truncated")
    replident = chr(buf[pos])
    (ncols,) = _I16.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        if pos >= len(buf):
            raise ProtocolError("Relation column truncated")
        flags = buf[pos]
        col_name, pos = _string(buf, pos + 1)
        type_oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(flags, col_name, type_oid, typmod))
    _expect_end(buf, pos, "Relation")
    return Relation(relid, namespace, name, replident, tuple(columns))


def _decode_type(buf: bytes) -> TypeMessage:
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    _expect_end(buf, pos, "Type")
    return TypeMessage(oid, namespace, name)


def _decode_update(buf: bytes) -> Update:
    (relid,) = _U32.unpack_from(buf, 1)
    pos = 5
    old: tuple[TupleValue, ...] | None = None
    old_kind: str | None = None
    marker = buf[pos]
    if marker in (0x4B, 0x4F):  # 'K' or 'O'
        old_kind = chr(marker)
        old, pos = _tuple(buf, pos + 1)
        marker = buf[pos]
    if marker != 0x4E:
        raise ProtocolError(f"Update without new tuple marker, got {chr(marker)!r}")
    new, pos = _tuple(buf, pos + 1)
    _expect_end(buf, pos, "Update")
    return Update(relid, old, old_kind, new)


def _decode_delete(buf: bytes) -> Delete:
    (relid,) = _U32.unpack_from(buf, 1)
    marker = buf[5]
    if marker not in (0x4B, 0x4F):
        raise ProtocolError(f"Delete without old tuple marker, got {chr(marker)!r}")
    old, pos = _tuple(buf, 6)
    _expect_end(buf, pos, "Delete")
    return Delete(relid, old, chr(marker))


def _decode_truncate(buf: bytes) -> Truncate:
    nrels, options = _TRUNCATE_HEAD.unpack_from(buf, 1)
    end = 6 + 4 * nrels
    if len(buf) != end:
        raise ProtocolError(f"Truncate of {len(buf)} bytes, expected {end}")
    relids = struct.unpack_from(f"!{nrels}I", buf, 6)
    return Truncate(options, tuple(relids))


def _decode_message(buf: bytes) -> LogicalMessage:
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, 1)
    prefix, pos = _string(buf, 10)
    (length,) = _U32.unpack_from(buf, pos)
    pos += 4
    if pos + length != len(buf):
        raise ProtocolError("Message content length does not match the frame")
    return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos:])


_DECODERS = {
    ord("I"): _decode_insert,
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_message,
}


def decode_message(payload: bytes | memoryview) -> PgOutputMessage:
    """One pgoutput v1 message (the payload of an XLogData frame)."""
    buf = bytes(payload) if not isinstance(payload, bytes) else payload
    if not buf:
        raise ProtocolError("empty pgoutput message")
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        name = _UNSUPPORTED.get(buf[0])
        if name is not None:
            raise ProtocolError(
                f"pgoutput {name} message ({chr(buf[0])!r}) is not supported with proto_version 1"
            )
        raise ProtocolError(f"unknown pgoutput message type {chr(buf[0])!r}")
    try:
        return decoder(buf)
    except (struct.error, IndexError) as exc:
        raise ProtocolError(f"truncated pgoutput {chr(buf[0])!r} message: {exc}") from None

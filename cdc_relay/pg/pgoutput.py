"""Decode pgoutput (proto_version 1): the payload of the replication stream's XLogData.

Pure functions over bytes, no I/O: the replication connection hands payloads
in (``walproto`` unwraps the CopyData frames), frozen message objects come out.
Layouts follow PostgreSQL's protocol docs ("Logical Replication Message
Formats") and ``logical/proto.c``: network byte order, LSNs uint64, xids and
OIDs uint32, type modifiers int32, timestamps int64 microseconds since
2000-01-01 UTC (``walproto.pg_time_to_datetime``), strings NUL-terminated UTF-8.

Text column values stay raw UTF-8 ``bytes``: the outbox payload (jsonb text)
becomes the AMQP body without a decode/encode round trip, and callers decode
only the columns they need. Binary-format values are wrapped in ``Binary`` so
they can never be mistaken for text.

Anything malformed, truncated, followed by trailing bytes, or of an unknown or
unsupported type raises ``ProtocolError``. Nothing is ever skipped: skipping a
message we do not understand could silently skip an outbox row.

The Insert path is the hot one (one per outbox row), so it is special-cased
and written for CPython speed: one ``unpack_from`` for the header, one per
text value, slices only for the values themselves, and bounds checked once at
the end (Python slices clamp, so an overrun shows up as a final position past
the end; reads past the end raise ``struct.error``/``IndexError``, which
``decode_message`` turns into ``ProtocolError``).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final

__all__ = [
    "BEGIN_TAG",
    "COMMIT_TAG",
    "UNCHANGED_TOAST",
    "Begin",
    "Binary",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Origin",
    "PgOutputMessage",
    "ProtocolError",
    "Relation",
    "Truncate",
    "TupleValue",
    "TypeMessage",
    "UnchangedToast",
    "Update",
    "begin_fields_at",
    "commit_fields_at",
    "decode_message",
    "decode_message_at",
]


class ProtocolError(Exception):
    """Bytes that are not a valid message of the protocol we speak; never skip past one."""


class UnchangedToast(enum.Enum):
    """Type of ``UNCHANGED_TOAST``: an enum so the sentinel is a picklable singleton."""

    UNCHANGED_TOAST = "u"

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast.UNCHANGED_TOAST
"""An UPDATE's new-tuple value that is TOASTed on disk and did not change ('u').

The server does not send it; the value must come from elsewhere (or be ignored).
"""


@dataclass(slots=True, frozen=True)
class Binary:
    """A column value in binary (send/recv) format, kept apart from text ``bytes``."""

    data: bytes


TupleValue = bytes | None | UnchangedToast | Binary
"""Text value (raw UTF-8 bytes), NULL, unchanged TOAST, or binary value."""


def _slot_setters(cls: type) -> tuple[Callable[[object, Any], None], ...]:
    """The slot descriptors' setters of a slotted dataclass, in field order.

    The per-change constructors (Insert, Begin, Commit) set slots directly instead
    of going through the frozen ``__init__`` (an ``object.__setattr__`` call per
    field): about 0.35 µs less per change, ~10% of decoding. The objects are the
    same (eq, hash, repr). Unpacking the result into one name per field makes
    the import fail if fields are added without updating the fast path.
    """
    return tuple(vars(cls)[f.name].__set__ for f in fields(cls))


_new = object.__new__


# -- pgoutput messages -------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Column:
    """One column of a Relation message; flags bit 1 marks a replica identity column."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(slots=True, frozen=True)
class Begin:
    """'B': final_lsn is the commit record's LSN (== Commit.commit_lsn)."""

    final_lsn: int
    commit_ts: int
    xid: int


@dataclass(slots=True, frozen=True)
class Commit:
    """'C': acknowledge end_lsn (not commit_lsn) once the transaction is durable downstream."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int


_begin_final_lsn, _begin_commit_ts, _begin_xid = _slot_setters(Begin)
_commit_flags, _commit_commit_lsn, _commit_end_lsn, _commit_commit_ts = _slot_setters(Commit)


@dataclass(slots=True, frozen=True)
class Origin:
    """'O': the transaction was replayed from a replication origin."""

    commit_lsn: int
    name: str


@dataclass(slots=True, frozen=True)
class Relation:
    """'R': schema of a table, sent before its first change on each connection.

    ``namespace`` is empty for pg_catalog; ``replica_identity`` is one of 'dnfi'.
    """

    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(slots=True, frozen=True)
class TypeMessage:
    """'Y': a non-built-in column type, sent before the Relation that uses it."""

    type_oid: int
    namespace: str
    name: str


@dataclass(slots=True, frozen=True)
class Insert:
    """'I': a new row; values in Relation column order."""

    relid: int
    new: tuple[TupleValue, ...]


@dataclass(slots=True, frozen=True)
class Update:
    """'U': old is present only for a key change ('K') or REPLICA IDENTITY FULL ('O')."""

    relid: int
    old: tuple[TupleValue, ...] | None
    old_kind: str | None
    new: tuple[TupleValue, ...]


@dataclass(slots=True, frozen=True)
class Delete:
    """'D': old holds the key columns ('K') or the whole row ('O')."""

    relid: int
    old: tuple[TupleValue, ...]
    old_kind: str


@dataclass(slots=True, frozen=True)
class Truncate:
    """'T': options bit 1 = CASCADE, bit 2 = RESTART IDENTITY."""

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
    """'M': pg_logical_emit_message output (needs the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


_insert_relid, _insert_new = _slot_setters(Insert)

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

_BEGIN: Final = struct.Struct("!QqI")  # final_lsn, commit_ts, xid
_COMMIT: Final = struct.Struct("!BQQq")  # flags, commit_lsn, end_lsn, commit_ts
_BEGIN_SIZE: Final = 1 + _BEGIN.size  # 21
_COMMIT_SIZE: Final = 1 + _COMMIT.size  # 26
_U64: Final = struct.Struct("!Q")
_U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")
_REL_ID_TAG_NCOLS: Final = struct.Struct("!IBH")  # Insert: relid, 'N', ncols
_REL_ID_TAG: Final = struct.Struct("!IB")  # Update/Delete: relid, first tuple marker
_IDENT_NCOLS: Final = struct.Struct("!BH")  # Relation: replica identity, ncols
_COLUMN_TAIL: Final = struct.Struct("!Ii")  # Relation column: type oid, typmod
_TRUNCATE_HEAD: Final = struct.Struct("!IB")  # nrels, options
_MESSAGE_HEAD: Final = struct.Struct("!BQ")  # flags, lsn

_NEW: Final = 0x4E  # tuple marker 'N'
BEGIN_TAG: Final = 0x42  # 'B': the first byte of a Begin message
COMMIT_TAG: Final = 0x43  # 'C'
_OLD_KINDS: Final = {0x4B: "K", 0x4F: "O"}  # old tuple markers: key columns / whole row
_REPLICA_IDENTITIES: Final = {ord(c): c for c in "dnfi"}

_UNSUPPORTED: Final = {
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
    """A NUL-terminated UTF-8 string at pos, and the position after its NUL."""
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"string is not valid UTF-8: {exc}") from None


def _tuple(buf: bytes, pos: int) -> tuple[tuple[TupleValue, ...], int]:
    """TupleData at pos, and the position after it (may be past the end: caller checks)."""
    (ncols,) = _U16.unpack_from(buf, pos)
    pos += 2
    u32 = _U32.unpack_from
    values: list[TupleValue] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        if kind == 0x74:  # 't' text
            start = pos + 5
            pos = start + u32(buf, pos + 1)[0]
            append(buf[start:pos])
        elif kind == 0x6E:  # 'n' NULL
            pos += 1
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOAST
            pos += 1
            append(UNCHANGED_TOAST)
        elif kind == 0x62:  # 'b' binary
            start = pos + 5
            pos = start + u32(buf, pos + 1)[0]
            append(Binary(buf[start:pos]))
        else:
            raise ProtocolError(f"unknown tuple value kind {bytes([kind])!r}")
    return tuple(values), pos


def _end(buf: bytes, pos: int, what: str) -> None:
    """Reject a message that ran past the buffer or left bytes after itself."""
    size = len(buf)
    if pos != size:
        if pos > size:
            raise ProtocolError(f"truncated {what} message")
        raise ProtocolError(f"{size - pos} trailing byte(s) after {what} message")


def _decode_insert(buf: bytes, start: int = 0) -> Insert:
    # _tuple inlined (one call less): this runs once per outbox row. Literal
    # kind bytes, text first: LOAD_CONST beats a global lookup in the loop.
    relid, marker, ncols = _REL_ID_TAG_NCOLS.unpack_from(buf, start + 1)
    if marker != _NEW:
        raise ProtocolError(f"Insert without new tuple marker 'N', got {bytes([marker])!r}")
    pos = start + 8
    u32 = _U32.unpack_from
    values: list[TupleValue] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        if kind == 0x74:  # 't' text
            begin = pos + 5
            pos = begin + u32(buf, pos + 1)[0]
            append(buf[begin:pos])
        elif kind == 0x6E:  # 'n' NULL
            pos += 1
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOAST
            pos += 1
            append(UNCHANGED_TOAST)
        elif kind == 0x62:  # 'b' binary
            begin = pos + 5
            pos = begin + u32(buf, pos + 1)[0]
            append(Binary(buf[begin:pos]))
        else:
            raise ProtocolError(f"unknown tuple value kind {bytes([kind])!r}")
    if pos != len(buf):
        _end(buf, pos, "Insert")
    insert = _new(Insert)  # == Insert(relid, tuple(values)), see _slot_setters
    _insert_relid(insert, relid)
    _insert_new(insert, tuple(values))
    return insert


def _decode_begin(buf: bytes, start: int = 0) -> Begin:
    final_lsn, commit_ts, xid = begin_fields_at(buf, start)
    begin = _new(Begin)  # == Begin(final_lsn, commit_ts, xid), see _slot_setters
    _begin_final_lsn(begin, final_lsn)
    _begin_commit_ts(begin, commit_ts)
    _begin_xid(begin, xid)
    return begin


def _decode_commit(buf: bytes, start: int = 0) -> Commit:
    flags, commit_lsn, end_lsn, commit_ts = commit_fields_at(buf, start)
    commit = _new(Commit)  # == Commit(flags, commit_lsn, end_lsn, commit_ts)
    _commit_flags(commit, flags)
    _commit_commit_lsn(commit, commit_lsn)
    _commit_end_lsn(commit, end_lsn)
    _commit_commit_ts(commit, commit_ts)
    return commit


def begin_fields_at(buf: bytes, start: int) -> tuple[int, int, int]:
    """The Begin message ``buf[start:]`` as (final_lsn, commit_ts, xid), without a Begin object.

    The session core's hot path (one Begin and one Commit per transaction) reads
    these fields only; the objects cost more than the reading (measured).
    """
    if len(buf) - start != _BEGIN_SIZE:
        _end(buf, start + _BEGIN_SIZE, "Begin")
    return _BEGIN.unpack_from(buf, start + 1)


def commit_fields_at(buf: bytes, start: int) -> tuple[int, int, int, int]:
    """The Commit message ``buf[start:]`` as (flags, commit_lsn, end_lsn, commit_ts)."""
    if len(buf) - start != _COMMIT_SIZE:
        _end(buf, start + _COMMIT_SIZE, "Commit")
    return _COMMIT.unpack_from(buf, start + 1)


def _decode_origin(buf: bytes) -> Origin:
    (lsn,) = _U64.unpack_from(buf, 1)
    name, pos = _string(buf, 9)
    _end(buf, pos, "Origin")
    return Origin(lsn, name)


def _decode_relation(buf: bytes) -> Relation:
    (relid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    ident, ncols = _IDENT_NCOLS.unpack_from(buf, pos)
    replica_identity = _REPLICA_IDENTITIES.get(ident)
    if replica_identity is None:
        raise ProtocolError(f"Relation with unknown replica identity {bytes([ident])!r}")
    pos += 3
    columns: list[Column] = []
    for _ in range(ncols):
        flags = buf[pos]
        column_name, pos = _string(buf, pos + 1)
        type_oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(flags, column_name, type_oid, typmod))
    _end(buf, pos, "Relation")
    return Relation(relid, namespace, name, replica_identity, tuple(columns))


def _decode_type(buf: bytes) -> TypeMessage:
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    _end(buf, pos, "Type")
    return TypeMessage(oid, namespace, name)


def _decode_update(buf: bytes) -> Update:
    relid, marker = _REL_ID_TAG.unpack_from(buf, 1)
    old: tuple[TupleValue, ...] | None = None
    pos = 6
    old_kind = _OLD_KINDS.get(marker)
    if old_kind is not None:
        old, pos = _tuple(buf, pos)
        marker = buf[pos]
        pos += 1
    if marker != _NEW:
        raise ProtocolError(f"Update without new tuple marker 'N', got {bytes([marker])!r}")
    new, pos = _tuple(buf, pos)
    _end(buf, pos, "Update")
    return Update(relid, old, old_kind, new)


def _decode_delete(buf: bytes) -> Delete:
    relid, marker = _REL_ID_TAG.unpack_from(buf, 1)
    old_kind = _OLD_KINDS.get(marker)
    if old_kind is None:
        raise ProtocolError(f"Delete without old tuple marker 'K'/'O', got {bytes([marker])!r}")
    old, pos = _tuple(buf, 6)
    _end(buf, pos, "Delete")
    return Delete(relid, old, old_kind)


def _decode_truncate(buf: bytes) -> Truncate:
    nrels, options = _TRUNCATE_HEAD.unpack_from(buf, 1)
    _end(buf, 6 + 4 * nrels, "Truncate")
    return Truncate(options, struct.unpack_from(f"!{nrels}I", buf, 6))


def _decode_logical_message(buf: bytes) -> LogicalMessage:
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, 1)
    prefix, pos = _string(buf, 10)
    (length,) = _U32.unpack_from(buf, pos)
    pos += 4
    _end(buf, pos + length, "Message")
    return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos:])


_DECODERS: Final[dict[int, Callable[[bytes], PgOutputMessage]]] = {
    ord("I"): _decode_insert,
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_logical_message,
}


def decode_message(payload: bytes | bytearray | memoryview) -> PgOutputMessage:
    """Decode exactly one pgoutput v1 message (the whole payload of one XLogData frame)."""
    return decode_message_at(payload if type(payload) is bytes else bytes(payload), 0)


def decode_message_at(buf: bytes, start: int) -> PgOutputMessage:
    """Decode the one pgoutput v1 message that is ``buf[start:]``.

    The replication frame itself can be passed with the offset of its payload:
    the hot messages (Insert, Begin, Commit) are read in place, without a copy
    of the payload.
    """
    if start >= len(buf):
        raise ProtocolError("empty pgoutput message")
    tag = buf[start]
    try:
        if tag == 0x49:  # 'I': skip the dict lookup on the hot path
            return _decode_insert(buf, start)
        if tag == 0x42:  # 'B'
            return _decode_begin(buf, start)
        if tag == 0x43:  # 'C'
            return _decode_commit(buf, start)
        decoder = _DECODERS.get(tag)
        if decoder is not None:
            return decoder(buf[start:] if start else buf)
    except (struct.error, IndexError):
        size = len(buf) - start
        raise ProtocolError(f"truncated pgoutput {chr(tag)!r} message ({size} bytes)") from None
    name = _UNSUPPORTED.get(tag)
    if name is not None:
        raise ProtocolError(
            f"pgoutput {name} message ({chr(tag)!r}) is not supported with proto_version 1"
        )
    raise ProtocolError(f"unknown pgoutput message type {bytes([tag])!r}")

"""The walsender's CopyData framing around pgoutput: XLogData, keepalive, standby status.

Pure functions over bytes, no I/O. Inside a COPY_BOTH replication stream the
server sends XLogData ('w', a pgoutput message as payload) and primary
keepalives ('k'); the client answers with standby status updates ('r').
Layouts follow PostgreSQL's "Streaming Replication Protocol" docs: network
byte order, LSNs uint64, times int64 microseconds since 2000-01-01 UTC (the
same clock as the commit timestamps inside pgoutput's Begin and Commit).

A malformed frame raises pgoutput's ``ProtocolError``: one error type for
"bytes we do not understand", so the caller has one thing to catch and never
skips past a frame.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Final

from cdc_relay.pg.pgoutput import ProtocolError

__all__ = [
    "PG_EPOCH_UNIX",
    "PG_EPOCH_US",
    "XLOG_PAYLOAD_AT",
    "PrimaryKeepalive",
    "XLogData",
    "decode_copy_data",
    "encode_standby_status",
    "pg_now_us",
    "pg_time_to_datetime",
    "xlog_wal_end",
]

PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 00:00 UTC in Unix microseconds
PG_EPOCH_UNIX: Final = PG_EPOCH_US // 1_000_000  # the same instant in Unix seconds
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(slots=True, frozen=True)
class XLogData:
    """'w' frame: WAL data; for logical slots data_start == wal_end == the change's LSN.

    ``payload`` is always produced as ``bytes`` (one copy of the frame tail), so
    ``decode_message`` can slice it without another copy.
    """

    data_start: int
    wal_end: int
    send_time: int
    payload: memoryview | bytes


@dataclass(slots=True, frozen=True)
class PrimaryKeepalive:
    """'k' frame: the server's sent position; reply_requested asks for a status update now."""

    wal_end: int
    send_time: int
    reply_requested: bool


# One XLogData per decoded change: built by setting its slots directly instead
# of the frozen __init__ (an object.__setattr__ per field), as pgoutput does for
# Insert. Unpacking one name per field makes the import fail if fields change.
_xlog_start, _xlog_end, _xlog_time, _xlog_payload = (
    vars(XLogData)[f.name].__set__ for f in fields(XLogData)
)
_new = object.__new__

_XLOG_HEADER: Final = struct.Struct("!QQq")  # data_start, wal_end, send_time (after 'w')
_KEEPALIVE: Final = struct.Struct("!QqB")  # wal_end, send_time, reply_requested (after 'k')
_STANDBY_STATUS: Final = struct.Struct("!cQQQqB")
_XLOG_HEADER_SIZE: Final = 1 + _XLOG_HEADER.size  # 25
_KEEPALIVE_SIZE: Final = 1 + _KEEPALIVE.size  # 18
_WAL_END_AT: Final = 9  # an XLogData frame's wal_end: after 'w' and data_start
_U64: Final = struct.Struct("!Q")
XLOG_PAYLOAD_AT: Final = _XLOG_HEADER_SIZE
"""Where an XLogData frame's payload (one pgoutput message) starts."""


def decode_copy_data(data: bytes | bytearray | memoryview) -> XLogData | PrimaryKeepalive:
    """Split one CopyData frame of the replication stream into its wrapper fields."""
    size = len(data)
    if size == 0:
        raise ProtocolError("empty CopyData frame")
    tag = data[0]
    if tag == 0x77:  # 'w'
        if size < _XLOG_HEADER_SIZE:
            raise ProtocolError(f"XLogData frame truncated: {size} bytes, header needs 25")
        start, end, sent = _XLOG_HEADER.unpack_from(data, 1)
        payload = data[_XLOG_HEADER_SIZE:]
        frame = _new(XLogData)  # == XLogData(start, end, sent, payload), see above
        _xlog_start(frame, start)
        _xlog_end(frame, end)
        _xlog_time(frame, sent)
        _xlog_payload(frame, payload if type(payload) is bytes else bytes(payload))
        return frame
    if tag == 0x6B:  # 'k'
        if size != _KEEPALIVE_SIZE:
            raise ProtocolError(f"primary keepalive frame of {size} bytes, expected 18")
        wal_end, sent, reply = _KEEPALIVE.unpack_from(data, 1)
        return PrimaryKeepalive(wal_end, sent, reply != 0)
    raise ProtocolError(f"unknown CopyData message type {bytes([tag])!r}")


def xlog_wal_end(data: bytes) -> int:
    """The ``wal_end`` of an XLogData frame with a payload, else -1.

    The hot path's split of a frame: its payload is then decoded in place
    (``pgoutput.decode_message_at(data, XLOG_PAYLOAD_AT)``), without the
    ``XLogData`` object and the payload copy of ``decode_copy_data``, which
    answers (or refuses) every other frame.
    """
    if len(data) > _XLOG_HEADER_SIZE and data[0] == 0x77:  # 'w'
        return _U64.unpack_from(data, _WAL_END_AT)[0]  # type: ignore[no-any-return]
    return -1


def encode_standby_status(
    write: int, flush: int, apply: int, client_time: int, reply_requested: bool = False
) -> bytes:
    """Standby status update ('r', 34 bytes); positions are 'last byte + 1'."""
    try:
        return _STANDBY_STATUS.pack(
            b"r", write, flush, apply, client_time, 1 if reply_requested else 0
        )
    except struct.error as exc:
        raise ValueError(f"standby status field out of range: {exc}") from None


def pg_now_us() -> int:
    """Now, in the protocol's clock: microseconds since 2000-01-01 UTC."""
    return time.time_ns() // 1000 - PG_EPOCH_US


def pg_time_to_datetime(us: int) -> datetime:
    """A protocol timestamp (µs since 2000-01-01 UTC) as an aware UTC datetime.

    Raises OverflowError outside datetime's years 1-9999 (e.g. ±infinity).
    """
    return _PG_EPOCH + timedelta(microseconds=us)

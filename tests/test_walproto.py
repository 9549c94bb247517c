"""The walsender CopyData framing: XLogData, primary keepalive, standby status, the clock.

No servers needed. Frames are built here with ``struct`` from the protocol docs
("Streaming Replication Protocol"), independently of ``walproto``; the payloads
are the pgoutput bytes captured from PostgreSQL in tests/captured_pgoutput.py.
"""

from __future__ import annotations

import contextlib
import struct
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdc_relay.lsn import Lsn
from cdc_relay.pg.pgoutput import ProtocolError, decode_message
from cdc_relay.pg.walproto import (
    PG_EPOCH_US,
    XLOG_PAYLOAD_AT,
    PrimaryKeepalive,
    XLogData,
    decode_copy_data,
    encode_standby_status,
    pg_now_us,
    pg_time_to_datetime,
    xlog_wal_end,
)
from tests import captured_pgoutput as cap

u64 = st.one_of(st.integers(0, 2**64 - 1), st.integers(2**64 - 1000, 2**64 - 1))
i64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), -1, 0, 2**63 - 1]))


def xlogdata_frame(data_start: int, wal_end: int, send_time: int, payload: bytes) -> bytes:
    return struct.pack("!cQQq", b"w", data_start, wal_end, send_time) + payload


def keepalive_frame(wal_end: int, send_time: int, reply: int) -> bytes:
    return struct.pack("!cQqB", b"k", wal_end, send_time, reply)


def test_captured_payload_through_xlogdata_frame() -> None:
    row = cap.CAPTURED[2]
    change_lsn = Lsn.parse(row.lsn)
    frame = xlogdata_frame(change_lsn, change_lsn, pg_now_us(), bytes.fromhex(row.hex))
    for data in (frame, memoryview(frame), bytearray(frame)):
        wrapper = decode_copy_data(data)
        assert isinstance(wrapper, XLogData)
        assert wrapper.data_start == wrapper.wal_end == change_lsn
        assert type(wrapper.payload) is bytes
        assert decode_message(wrapper.payload) == row.expected


u64 = st.one_of(st.integers(0, 2**64 - 1), st.integers(2**64 - 1000, 2**64 - 1))
i64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), -1, 0, 2**63 - 1]))


@given(u64, u64, i64, st.binary(max_size=64))
@example(2**64 - 1, 2**64 - 1, -(2**63), b"")
def test_xlogdata_frame(data_start: int, wal_end: int, send_time: int, payload: bytes) -> None:
    decoded = decode_copy_data(xlogdata_frame(data_start, wal_end, send_time, payload))
    assert decoded == XLogData(data_start, wal_end, send_time, payload)


@given(u64, u64, i64, st.binary(max_size=64))
@example(2**64 - 1, 2**64 - 1, -(2**63), b"")
def test_xlog_wal_end_splits_an_xlogdata_frame_with_a_payload(
    data_start: int, wal_end: int, send_time: int, payload: bytes
) -> None:
    frame = xlogdata_frame(data_start, wal_end, send_time, payload)
    assert xlog_wal_end(frame) == (wal_end if payload else -1)
    assert frame[XLOG_PAYLOAD_AT:] == payload


@pytest.mark.parametrize(
    "frame", [b"", keepalive_frame(5, 6, 1), b"x" + b"\x00" * 30, xlogdata_frame(1, 2, 3, b"")[:20]]
)
def test_xlog_wal_end_leaves_every_other_frame_to_decode_copy_data(frame: bytes) -> None:
    assert xlog_wal_end(frame) == -1


@given(u64, i64, st.sampled_from([0, 1]))
@example(2**64 - 1, -1, 1)
def test_keepalive_frame(wal_end: int, send_time: int, reply: int) -> None:
    decoded = decode_copy_data(keepalive_frame(wal_end, send_time, reply))
    assert decoded == PrimaryKeepalive(wal_end, send_time, bool(reply))
    assert type(decoded.reply_requested) is bool


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"x" + b"\x00" * 24,
        b"r" + b"\x00" * 33,  # our own status update is not a server message
        *(xlogdata_frame(1, 2, 3, b"")[:n] for n in range(1, 25)),
        *(keepalive_frame(1, 2, 0)[:n] for n in range(1, 18)),
        keepalive_frame(1, 2, 0) + b"\x00",
    ],
)
def test_bad_copy_data_frames(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_copy_data(frame)


@given(u64, u64, u64, i64, st.booleans())
def test_standby_status_layout(
    write: int, flush: int, apply: int, client_time: int, reply: bool
) -> None:
    message = encode_standby_status(write, flush, apply, client_time, reply)
    assert len(message) == 34
    assert struct.unpack("!cQQQqB", message) == (b"r", write, flush, apply, client_time, reply)


def test_standby_status_defaults_and_range() -> None:
    assert encode_standby_status(1, 2, 3, 4)[-1] == 0
    with pytest.raises(ValueError):
        encode_standby_status(2**64, 0, 0, 0)
    with pytest.raises(ValueError):
        encode_standby_status(-1, 0, 0, 0)


def test_pg_clock() -> None:
    before = time.time_ns() // 1000
    now = pg_now_us()
    after = time.time_ns() // 1000
    assert before - 946_684_800_000_000 <= now <= after - 946_684_800_000_000
    assert pg_time_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_time_to_datetime(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert pg_time_to_datetime(86_400_000_001) == datetime(2000, 1, 2, tzinfo=UTC) + timedelta(
        microseconds=1
    )
    assert abs(pg_time_to_datetime(now) - datetime.now(UTC)) < timedelta(seconds=5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_random_copy_data_never_escapes_as_other_errors(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_copy_data(raw)


@pytest.mark.parametrize("row", cap.CAPTURED + cap.CAPTURED_BINARY, ids=lambda r: r.lsn)
def test_every_captured_payload_round_trips_through_xlogdata(row: cap.Captured) -> None:
    """Each captured pgoutput payload, framed as walsender frames it, comes back byte-exact."""
    lsn = Lsn.parse(row.lsn)
    payload = bytes.fromhex(row.hex)
    sent = pg_now_us()
    wrapper = decode_copy_data(xlogdata_frame(lsn, lsn, sent, payload))
    assert wrapper == XLogData(lsn, lsn, sent, payload)
    assert decode_message(wrapper.payload) == row.expected


def test_xlogdata_fast_path_matches_dataclass_init() -> None:
    """XLogData is built by slot setters on the hot path: same objects."""
    frame = decode_copy_data(xlogdata_frame(1, 2, -3, b"I"))
    expected = XLogData(1, 2, -3, b"I")
    assert (frame, hash(frame), repr(frame)) == (expected, hash(expected), repr(expected))


def test_pg_epoch_constant() -> None:
    assert int(datetime(2000, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000 == PG_EPOCH_US

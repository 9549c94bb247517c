"""The pgoutput decoder: real captured bytes, round trips, and malformed input."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.pg.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Binary,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PrimaryKeepalive,
    ProtocolError,
    Relation,
    Truncate,
    TypeMessage,
    Update,
    XLogData,
    decode_copy_data,
    decode_message,
    encode_standby_status,
    pg_now_us,
    pg_time_to_datetime,
)
from tests.captured_pgoutput import CAPTURED
from tests.pgoutput_encoder import encode, keepalive, xlogdata

DECODED = [decode_message(bytes.fromhex(h)) for _, h in CAPTURED]


def test_captured_stream_has_the_expected_shape() -> None:
    kinds = [type(m).__name__ for m in DECODED]
    assert kinds == [
        "Begin", "Relation", "Insert", "Commit",
        "Begin", "TypeMessage", "Relation", "Insert", "Insert", "Commit",
        "Begin", "Update", "Commit",
        "Begin", "Delete", "Commit",
        "Begin", "TypeMessage", "Relation", "Truncate", "Commit",
        "Begin", "LogicalMessage", "Commit",
    ]  # fmt: skip


def test_captured_begin_and_commit_agree() -> None:
    begins = [m for m in DECODED if isinstance(m, Begin)]
    commits = [m for m in DECODED if isinstance(m, Commit)]
    for begin, commit in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert begin.commit_ts == commit.commit_ts
        assert commit.flags == 0
        ts = pg_time_to_datetime(commit.commit_ts)
        assert ts.year >= 2024 and ts.tzinfo is UTC
    assert [b.xid for b in begins] == sorted(b.xid for b in begins)


def test_captured_outbox_insert_values() -> None:
    relation = DECODED[1]
    insert = DECODED[2]
    assert isinstance(relation, Relation) and isinstance(insert, Insert)
    assert relation.namespace == "public" and relation.name == "outbox"
    assert relation.replica_identity == "d"
    assert [c.name for c in relation.columns][:5] == [
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
    ]
    assert relation.columns[0] == Column(1, "id", 2950, -1)  # uuid, part of the key
    assert relation.columns[4].type_oid == 3802  # jsonb
    assert insert.relid == relation.relid
    assert insert.new[0] == b"11111111-2222-3333-4444-555555555555"
    assert insert.new[4] == '{"name": "Zoë €", "total": 12.5}'.encode()
    assert insert.new[6] is None and insert.new[7] is None
    assert insert.new[8] == b"2026-11-23 10:11:12.123456+00"


def test_captured_non_ascii_names_types_nulls() -> None:
    type_message, relation, first, second = DECODED[5:9]
    assert isinstance(type_message, TypeMessage) and type_message.name == "mood"
    assert isinstance(relation, Relation)
    assert relation.name == "tâble" and relation.columns[1].name == "ñame"
    assert relation.columns[2].type_oid == type_message.type_oid
    assert relation.replica_identity == "f"
    assert first == Insert(relation.relid, (b"1", "héllo".encode(), b"happy"))
    assert second == Insert(relation.relid, (b"2", None, None))


def test_captured_update_delete_truncate_message() -> None:
    update, delete, truncate, message = DECODED[11], DECODED[14], DECODED[19], DECODED[22]
    assert isinstance(update, Update) and update.old_kind == "O"
    assert update.new[1] == "wörld".encode() and update.old is not None
    assert isinstance(delete, Delete) and delete.old == (b"2", None, None)
    assert isinstance(truncate, Truncate) and truncate.relids == (update.relid,)
    assert not truncate.cascade and not truncate.restart_identity
    assert message == LogicalMessage(True, message.lsn, "cdc", "transactional ✓".encode())


def test_wrappers_and_status() -> None:
    frame = xlogdata(10, 20, 30, b"B" + b"\x00" * 20)
    decoded = decode_copy_data(frame)
    assert isinstance(decoded, XLogData)
    assert (decoded.data_start, decoded.wal_end, decoded.send_time) == (10, 20, 30)
    assert decoded.payload == b"B" + b"\x00" * 20
    ka = decode_copy_data(keepalive(2**64 - 1, -5, True))
    assert ka == PrimaryKeepalive(2**64 - 1, -5, True)
    status = encode_standby_status(1, 2, 3, 4, True)
    assert len(status) == 34
    assert struct.unpack("!cQQQqB", status) == (b"r", 1, 2, 3, 4, 1)
    now = pg_time_to_datetime(pg_now_us())
    assert abs((now - datetime.now(UTC)).total_seconds()) < 5


@pytest.mark.parametrize("frame", [b"", b"x123", b"w" + b"\x00" * 10, b"k" + b"\x00" * 16])
def test_bad_copy_data(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_copy_data(frame)


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
names = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=20)
text_values = st.binary(max_size=50)
values = st.one_of(
    text_values, st.none(), st.just(UNCHANGED_TOAST), st.builds(Binary, st.binary(max_size=20))
)
tuples = st.lists(values, max_size=8).map(tuple)
columns = st.builds(Column, st.integers(0, 1), names, u32, st.integers(-(2**31), 2**31 - 1))
messages = st.one_of(
    st.builds(Begin, u64, i64, u32),
    st.builds(Commit, st.just(0), u64, u64, i64),
    st.builds(Origin, u64, names),
    st.builds(
        Relation,
        u32,
        names,
        names,
        st.sampled_from("dnfi"),
        st.lists(columns, max_size=6).map(tuple),
    ),
    st.builds(TypeMessage, u32, names, names),
    st.builds(Insert, u32, tuples),
    st.builds(Update, u32, st.none(), st.none(), tuples),
    st.builds(Update, u32, tuples, st.sampled_from("KO"), tuples),
    st.builds(Delete, u32, tuples, st.sampled_from("KO")),
    st.builds(Truncate, st.integers(0, 3), st.lists(u32, max_size=5).map(tuple)),
    st.builds(LogicalMessage, st.booleans(), u64, names, st.binary(max_size=40)),
)


@settings(max_examples=400, deadline=None)
@given(messages)
def test_round_trip(message: object) -> None:
    assert decode_message(encode(message)) == message  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(messages)
def test_every_strict_prefix_is_rejected(message: object) -> None:
    raw = encode(message)  # type: ignore[arg-type]
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode_message(raw[:cut])


@settings(max_examples=150, deadline=None)
@given(messages, st.binary(min_size=1, max_size=4))
def test_trailing_garbage_is_rejected(message: object, garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(encode(message) + garbage)  # type: ignore[arg-type]


@pytest.mark.parametrize("tag", list(b"SEcAbPKrp"))
def test_streaming_and_two_phase_messages_are_refused(tag: int) -> None:
    with pytest.raises(ProtocolError, match="not supported with proto_version 1"):
        decode_message(bytes([tag]) + b"\x00" * 30)


@pytest.mark.parametrize("tag", [ord("Z"), ord("x"), 0])
def test_unknown_message_type_is_an_error(tag: int) -> None:
    with pytest.raises(ProtocolError, match="unknown pgoutput message type"):
        decode_message(bytes([tag]) + b"\x00" * 30)


def test_unknown_tuple_kind_is_an_error() -> None:
    raw = b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"z"
    with pytest.raises(ProtocolError, match="tuple value kind"):
        decode_message(raw)


def test_xids_and_oids_are_unsigned() -> None:
    begin = decode_message(encode(Begin(1, 2, 2**32 - 1)))
    assert isinstance(begin, Begin) and begin.xid == 2**32 - 1
    insert = decode_message(encode(Insert(2**31 + 5, (b"x",))))
    assert isinstance(insert, Insert) and insert.relid == 2**31 + 5

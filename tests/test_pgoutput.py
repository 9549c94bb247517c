"""The pgoutput decoder: real captured bytes, round trips, malformed input.

No servers needed: tests/captured_pgoutput.py holds bytes captured from
PostgreSQL 15 by tests/capture_pgoutput.py, and tests/pgoutput_encoder.py is an
encoder written independently of the decoder for the round trips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import struct
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_relay.lsn import Lsn
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
    PgOutputMessage,
    ProtocolError,
    Relation,
    Truncate,
    TupleValue,
    TypeMessage,
    UnchangedToast,
    Update,
    begin_fields_at,
    commit_fields_at,
    decode_message,
    decode_message_at,
)
from cdc_relay.pg.walproto import pg_time_to_datetime
from tests import captured_pgoutput as cap
from tests.pgoutput_encoder import encode

ALL_CAPTURED = cap.CAPTURED + cap.CAPTURED_BINARY
DECODED: list[PgOutputMessage] = [decode_message(bytes.fromhex(c.hex)) for c in cap.CAPTURED]
OUTBOX, TABLE, DOC = cap.RELIDS["outbox"], cap.RELIDS["tâble"], cap.RELIDS["doc"]
OID_INT4, OID_TEXT, OID_VARCHAR, OID_NUMERIC = 23, 25, 1043, 1700
OID_UUID, OID_JSONB, OID_TIMESTAMPTZ = 2950, 3802, 1184


def transactions() -> Iterator[tuple[Begin, list[PgOutputMessage], Commit, str]]:
    """Begin, body, Commit, and the Commit row's peek lsn, per captured transaction."""
    begin: Begin | None = None
    body: list[PgOutputMessage] = []
    for row, message in zip(cap.CAPTURED, DECODED, strict=True):
        if isinstance(message, Begin):
            assert begin is None, "nested Begin"
            begin, body = message, []
        elif isinstance(message, Commit):
            assert begin is not None, "Commit without Begin"
            yield begin, body, message, row.lsn
            begin = None
        elif begin is not None:
            body.append(message)
    assert begin is None, "unterminated transaction"


# -- 1. captured real bytes ------------------------------------------------------------


@pytest.mark.parametrize("row", ALL_CAPTURED, ids=lambda c: f"{c.lsn}-{c.hex[:2]}")
def test_captured_message_decodes_exactly(row: cap.Captured) -> None:
    decoded = decode_message(bytes.fromhex(row.hex))
    assert type(decoded) is type(row.expected)
    assert decoded == row.expected
    # The encoder, written from the docs, reproduces the server's bytes exactly.
    assert encode(decoded).hex() == row.hex


def test_captured_stream_shape() -> None:
    kinds = "".join(bytes.fromhex(c.hex)[:1].decode() for c in cap.CAPTURED)
    assert kinds == (
        "BRIC"  # outbox insert
        "BIYRIIC"  # outbox + tâble inserts: Type before the Relation using it
        "BUC"  # update, replica identity full
        "BUUC"  # outbox updates: no old tuple, then key change
        "BRUC"  # unchanged TOAST
        "BDDC"  # deletes 'K' and 'O'
        "BYRRTC"  # truncate two tables (relcache reset re-sends Type/Relation)
        "BRTC"  # truncate outbox
        "BORIC"  # replayed transaction with an origin
        "BMC"  # transactional message
        "M"  # non-transactional message from an aborted transaction: no B/C
        "BYRIC"  # the last, flushing transaction
    )
    assert all(type(m) is type(c.expected) for m, c in zip(DECODED, cap.CAPTURED, strict=True))


def test_captured_transactions_match_server_facts() -> None:
    txns = list(transactions())
    assert len(txns) == len(cap.TRANSACTIONS)
    previous_end = 0
    for (begin, _, commit, row_lsn), (label, xid, commit_ts) in zip(
        txns, cap.TRANSACTIONS, strict=True
    ):
        assert begin.xid == xid, label
        assert begin.final_lsn == commit.commit_lsn, label
        assert begin.commit_ts == commit.commit_ts == commit_ts, label
        assert commit.flags == 0
        assert commit.end_lsn == Lsn.parse(row_lsn), label  # the peek reports end_lsn
        assert commit.commit_lsn < commit.end_lsn, label
        assert commit.end_lsn > previous_end, label  # acked positions only move forward
        previous_end = commit.end_lsn
        ts = pg_time_to_datetime(commit.commit_ts)
        assert ts.tzinfo is UTC
        if label != "origin":
            assert ts.year >= 2024, label


def test_captured_origin_and_negative_commit_ts() -> None:
    [(begin, body, commit, _)] = [t for t in transactions() if any(type(m) is Origin for m in t[1])]
    origin = body[0]
    assert origin == Origin(Lsn.parse(cap.ORIGIN_LSN), cap.ORIGIN_NAME)
    # The origin's commit timestamp predates 2000-01-01: the int64 is negative.
    expected = datetime.fromisoformat(cap.ORIGIN_TS)
    assert begin.commit_ts == commit.commit_ts == -1_500_000
    assert pg_time_to_datetime(begin.commit_ts) == expected


def test_captured_outbox_relation_and_insert() -> None:
    relation, insert = DECODED[1], DECODED[2]
    assert isinstance(relation, Relation) and isinstance(insert, Insert)
    assert (relation.relid, relation.namespace, relation.name) == (OUTBOX, "public", "outbox")
    assert relation.replica_identity == "d"
    assert [(c.name, c.type_oid, c.is_key) for c in relation.columns] == [
        ("id", OID_UUID, True),
        ("aggregate_type", OID_TEXT, False),
        ("aggregate_id", OID_TEXT, False),
        ("event_type", OID_TEXT, False),
        ("payload", OID_JSONB, False),
        ("headers", OID_JSONB, False),
        ("exchange", OID_TEXT, False),
        ("routing_key", OID_TEXT, False),
        ("created_at", OID_TIMESTAMPTZ, False),
    ]
    assert all(c.type_modifier == -1 for c in relation.columns)
    assert insert.relid == OUTBOX
    assert all(type(v) is bytes for v in insert.new if v is not None)
    assert insert.new[0] == b"11111111-2222-3333-4444-555555555555"
    assert json.loads(insert.new[4]) == {"total": 12.5, "name": "Zoë €"}  # type: ignore[arg-type]
    assert insert.new[5] == b'{"tenant": "acme"}'
    assert insert.new[6] is None and insert.new[7] is None  # NULL exchange / routing_key
    assert insert.new[8] == b"2026-11-23 10:11:12.123456+00"


def test_captured_non_ascii_names_type_message_and_typmods() -> None:
    type_message, relation = DECODED[6], DECODED[7]
    assert type_message == TypeMessage(cap.EMOTION_TYPE_OID, "sché", "émotion")
    assert isinstance(relation, Relation)
    assert (relation.relid, relation.name, relation.replica_identity) == (TABLE, "tâble", "f")
    assert relation.columns == (
        Column(1, "k", OID_INT4, -1),
        Column(1, "ñame", OID_VARCHAR, 20 + 4),  # varchar(20): typmod = length + VARHDRSZ
        Column(1, "humeur", cap.EMOTION_TYPE_OID, -1),
        Column(1, "amount", OID_NUMERIC, ((10 << 16) | 2) + 4),  # numeric(10,2)
    )  # REPLICA IDENTITY FULL: every column is part of the identity
    assert DECODED[8] == Insert(TABLE, (b"1", "héllo".encode(), b"heureux", b"12.50"))
    assert DECODED[9] == Insert(TABLE, (b"2", None, None, None))


def test_captured_updates() -> None:
    full = DECODED[12]
    assert full == Update(
        TABLE,
        (b"1", "héllo".encode(), b"heureux", b"12.50"),
        "O",
        (b"1", "wörld".encode(), b"heureux", b"12.50"),
    )
    plain, key_change = DECODED[15], DECODED[16]
    assert isinstance(plain, Update) and isinstance(key_change, Update)
    assert (plain.relid, plain.old, plain.old_kind) == (OUTBOX, None, None)
    assert plain.new[3] == b"OrderPaid"
    assert key_change.old_kind == "K"
    assert key_change.old == (b"22222222-3333-4444-5555-666666666666",) + (None,) * 8
    assert key_change.new[0] == b"99999999-3333-4444-5555-666666666666"
    toast = DECODED[20]
    assert toast == Update(DOC, None, None, (b"1", UNCHANGED_TOAST, b"1"))


def test_captured_deletes_and_truncates() -> None:
    assert DECODED[23] == Delete(
        OUTBOX, (b"11111111-2222-3333-4444-555555555555",) + (None,) * 8, "K"
    )
    assert DECODED[24] == Delete(TABLE, (b"2", None, None, None), "O")
    both, outbox_only = DECODED[30], DECODED[34]
    assert isinstance(both, Truncate) and isinstance(outbox_only, Truncate)
    assert both.relids == (TABLE, DOC) and both.cascade and both.restart_identity
    assert outbox_only == Truncate(0, (OUTBOX,))
    assert not outbox_only.cascade and not outbox_only.restart_identity


def test_captured_logical_messages() -> None:
    messages = [(i, m) for i, m in enumerate(DECODED) if isinstance(m, LogicalMessage)]
    assert len(messages) == 2
    (i_tx, tx), (i_nontx, nontx) = messages
    assert isinstance(DECODED[i_tx - 1], Begin) and isinstance(DECODED[i_tx + 1], Commit)
    assert tx.transactional and tx.prefix == "cdc"
    assert tx.content.decode() == "transactional ✓"
    assert tx.lsn == Lsn.parse(cap.CAPTURED[i_tx].lsn)
    # Non-transactional: outside any Begin/Commit, even though its transaction aborted.
    assert isinstance(DECODED[i_nontx - 1], Commit) and isinstance(DECODED[i_nontx + 1], Begin)
    assert nontx == LogicalMessage(False, Lsn.parse(cap.CAPTURED[i_nontx].lsn), "", b"\0\xff\0")


def test_captured_binary_mode_values() -> None:
    decoded = [decode_message(bytes.fromhex(c.hex)) for c in cap.CAPTURED_BINARY]
    table_inserts = [m for m in decoded if isinstance(m, Insert) and m.relid == TABLE]
    first = table_inserts[0]
    assert first.new[0] == Binary(struct.pack("!i", 1))  # int4send
    assert first.new[1] == Binary("héllo".encode())  # varchar send format is the text
    assert not isinstance(first.new[0], bytes)  # never confused with a text value
    assert table_inserts[1].new == (Binary(struct.pack("!i", 2)), None, None, None)
    toast = [m for m in decoded if isinstance(m, Update) and m.relid == DOC]
    assert toast[0].new[1] is UNCHANGED_TOAST


@pytest.mark.parametrize("convert", [bytes, bytearray, memoryview], ids=lambda f: f.__name__)
def test_decode_accepts_bytes_like(convert: type) -> None:
    for row in cap.CAPTURED[:4]:
        decoded = decode_message(convert(bytes.fromhex(row.hex)))
        assert decoded == row.expected
        if isinstance(decoded, Insert):
            assert all(type(v) is bytes for v in decoded.new if v is not None)


# (2. the CopyData wrappers moved with walproto: tests/test_walproto.py)

u64 = st.one_of(st.integers(0, 2**64 - 1), st.integers(2**64 - 1000, 2**64 - 1))
i64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), -1, 0, 2**63 - 1]))


# -- 3. round trips through the independent encoder -------------------------------------

u32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(2**31, 2**32 - 1))
i32 = st.integers(-(2**31), 2**31 - 1)
u8 = st.integers(0, 255)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
values: st.SearchStrategy[TupleValue] = st.one_of(
    st.binary(max_size=40),
    st.none(),
    st.just(UNCHANGED_TOAST),
    st.builds(Binary, st.binary(max_size=16)),
    names.map(str.encode),
)
tuples = st.lists(values, max_size=10).map(tuple)
columns = st.builds(Column, u8, names, u32, i32)
messages: st.SearchStrategy[PgOutputMessage] = st.one_of(
    st.builds(Begin, u64, i64, u32),
    st.builds(Commit, u8, u64, u64, i64),
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
    st.builds(Truncate, u8, st.lists(u32, max_size=6).map(tuple)),
    st.builds(LogicalMessage, st.booleans(), u64, names, st.binary(max_size=40)),
)
EDGE_CASES: list[PgOutputMessage] = [
    Begin(2**64 - 1, -(2**63), 2**32 - 1),
    Commit(0, 2**64 - 2, 2**64 - 1, 2**63 - 1),
    Origin(0, ""),
    Relation(2**31, "", "", "n", ()),
    Relation(2**32 - 1, "名前空間", "🙂", "i", (Column(1, "ключ", 2**32 - 1, -(2**31)),)),
    TypeMessage(2**31, "", ""),
    Insert(0, ()),
    Insert(2**32 - 1, (b"", None, UNCHANGED_TOAST, Binary(b""), Binary(b"\0"), b"\0")),
    Update(1, None, None, ()),
    Update(1, (), "K", (UNCHANGED_TOAST,)),
    Delete(2**31, (), "O"),
    Truncate(0, ()),
    Truncate(255, (0, 2**32 - 1)),
    LogicalMessage(False, 2**64 - 1, "", b""),
]


@settings(max_examples=500, deadline=None)
@given(messages)
def test_round_trip(message: PgOutputMessage) -> None:
    decoded = decode_message(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)


@settings(max_examples=500, deadline=None)
@given(st.one_of(messages.map(encode), st.binary(max_size=64)), st.binary(max_size=30))
def test_decoding_in_place_after_a_prefix_is_decoding_the_payload(
    payload: bytes, prefix: bytes
) -> None:
    """decode_message_at (the frame with its payload's offset) == decode_message (the payload)."""
    try:
        expected: PgOutputMessage | str = decode_message(payload)
    except ProtocolError as exc:
        expected = str(exc)
    try:
        got: PgOutputMessage | str = decode_message_at(prefix + payload, len(prefix))
    except ProtocolError as exc:
        got = str(exc)
    assert got == expected
    assert type(got) is type(expected)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.builds(Begin, u64, i64, u32), st.builds(Commit, u8, u64, u64, i64)),
    st.binary(max_size=30),
    st.integers(-2, 2),
)
def test_begin_and_commit_fields_read_in_place_are_the_decoded_messages_fields(
    message: Begin | Commit, prefix: bytes, size_change: int
) -> None:
    """The core's object-free reading of Begin and Commit; a wrong size is refused alike."""
    payload = encode(message)
    payload = payload[: len(payload) + size_change] + b"\x00" * max(0, size_change)
    fields_at = begin_fields_at if type(message) is Begin else commit_fields_at
    if size_change:
        with pytest.raises(ProtocolError) as decoding:
            decode_message(payload)
        with pytest.raises(ProtocolError, match=re.escape(str(decoding.value))):
            fields_at(prefix + payload, len(prefix))
    else:
        assert fields_at(prefix + payload, len(prefix)) == dataclasses.astuple(message)


@pytest.mark.parametrize("message", EDGE_CASES, ids=repr)
def test_round_trip_edge_cases(message: PgOutputMessage) -> None:
    assert decode_message(encode(message)) == message


def test_value_kinds_stay_distinct() -> None:
    decoded = decode_message(encode(Insert(1, (b"ab", Binary(b"ab"), None, UNCHANGED_TOAST))))
    assert isinstance(decoded, Insert)
    text, binary, null, toast = decoded.new
    assert type(text) is bytes and type(binary) is Binary and null is None
    assert toast is UNCHANGED_TOAST and isinstance(toast, UnchangedToast)
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert not isinstance(binary, bytes) and binary.data == text


def test_unsigned_and_signed_fields() -> None:
    raw = b"R" + b"\xff" * 4 + b"s\0t\0d\0\x01" + b"\x01c\0" + b"\xff" * 8
    relation = decode_message(raw)
    assert isinstance(relation, Relation)
    assert relation.relid == 2**32 - 1  # OIDs are uint32
    assert relation.columns[0].type_oid == 2**32 - 1
    assert relation.columns[0].type_modifier == -1  # typmod is int32
    begin = decode_message(b"B" + b"\xff" * 20)
    assert begin == Begin(2**64 - 1, -1, 2**32 - 1)  # lsn uint64, ts int64, xid uint32


@pytest.mark.parametrize(
    ("options", "cascade", "restart"), [(0, False, False), (1, True, False), (2, False, True)]
)
def test_truncate_options(options: int, cascade: bool, restart: bool) -> None:
    truncate = decode_message(encode(Truncate(options, (1,))))
    assert isinstance(truncate, Truncate)
    assert (truncate.cascade, truncate.restart_identity) == (cascade, restart)


def test_fast_constructed_objects_match_dataclass_init() -> None:
    """Insert is built by slot setters on the hot path: same objects."""
    insert = decode_message(encode(Insert(7, (b"a", None, Binary(b"b")))))
    assert isinstance(insert, Insert)
    reference = Insert(7, (b"a", None, Binary(b"b")))
    assert (insert, hash(insert), repr(insert)) == (reference, hash(reference), repr(reference))
    with pytest.raises(dataclasses.FrozenInstanceError):
        insert.relid = 8  # type: ignore[misc]


def test_column_is_key() -> None:
    assert Column(1, "id", 23, -1).is_key and not Column(0, "x", 23, -1).is_key


def test_messages_are_frozen_and_slotted() -> None:
    for message in EDGE_CASES:
        assert not hasattr(message, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, dataclasses.fields(message)[0].name, 5)


# -- 4. robustness -----------------------------------------------------------------------


def assert_rejects_every_strict_prefix(raw: bytes) -> None:
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode_message(raw[:cut])


@pytest.mark.parametrize("row", ALL_CAPTURED, ids=lambda c: f"{c.lsn}-{c.hex[:2]}")
def test_captured_every_strict_prefix_rejected(row: cap.Captured) -> None:
    assert_rejects_every_strict_prefix(bytes.fromhex(row.hex))


@pytest.mark.parametrize("message", EDGE_CASES, ids=repr)
def test_edge_case_every_strict_prefix_rejected(message: PgOutputMessage) -> None:
    assert_rejects_every_strict_prefix(encode(message))


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_strict_prefix_rejected(message: PgOutputMessage) -> None:
    assert_rejects_every_strict_prefix(encode(message))


@pytest.mark.parametrize("row", ALL_CAPTURED, ids=lambda c: f"{c.lsn}-{c.hex[:2]}")
@pytest.mark.parametrize("garbage", [b"\x00", b"N", b"\xff" * 9])
def test_captured_trailing_garbage_rejected(row: cap.Captured, garbage: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"trailing|truncated"):
        decode_message(bytes.fromhex(row.hex) + garbage)


@settings(max_examples=200, deadline=None)
@given(messages, st.binary(min_size=1, max_size=12))
def test_trailing_garbage_rejected(message: PgOutputMessage, garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(encode(message) + garbage)


KNOWN = set(b"BCORYIUDTM")
UNSUPPORTED = set(b"SEcAbPKrp")


@pytest.mark.parametrize("tag", sorted(UNSUPPORTED), ids=chr)
def test_stream_and_two_phase_messages_refused(tag: int) -> None:
    with pytest.raises(ProtocolError, match="not supported with proto_version 1") as info:
        decode_message(bytes([tag]) + b"\x00" * 40)
    assert repr(chr(tag)) in str(info.value)


@pytest.mark.parametrize("tag", sorted(set(range(256)) - KNOWN - UNSUPPORTED))
def test_unknown_message_types_refused(tag: int) -> None:
    with pytest.raises(ProtocolError, match="unknown pgoutput message type") as info:
        decode_message(bytes([tag]) + b"\x00" * 40)
    assert repr(bytes([tag])) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "empty"),
        (b"I\0\0\0\1X\0\0", "new tuple marker"),
        (b"I\0\0\0\1N\0\1z", "tuple value kind"),
        (b"U\0\0\0\1X\0\0", "new tuple marker"),
        (b"U\0\0\0\1K\0\0X\0\0", "new tuple marker"),
        (b"D\0\0\0\1N\0\0", "old tuple marker"),
        (b"R\0\0\0\1s\0t\0x\0\0", "replica identity"),
        (b"R\0\0\0\1\xff\0t\0d\0\0", "UTF-8"),
        (b"Y\0\0\0\1s\0\xc3\0", "UTF-8"),
        (b"O" + b"\0" * 8 + b"no terminator", "unterminated"),
        (b"M\1" + b"\0" * 8 + b"p\0\0\0\0\5abc", "truncated"),
        (b"T\0\0\0\2\0\0\0\0\1", "truncated"),
        (b"T\xff\xff\xff\xff\0", "truncated"),
        (b"I\0\0\0\1N\0\1t\xff\xff\xff\xffab", "truncated"),
    ],
)
def test_malformed_messages(raw: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_message(raw)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.tuples(st.sampled_from(sorted(KNOWN)), st.binary(max_size=64)).map(
            lambda t: bytes([t[0]]) + t[1]
        ),
    )
)
def test_random_bytes_never_escape_as_other_errors(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_CAPTURED), st.data())
def test_mutated_captured_bytes_decode_or_raise_protocol_error(
    row: cap.Captured, data: st.DataObject
) -> None:
    raw = bytearray.fromhex(row.hex)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(u8)
    try:
        decoded = decode_message(bytes(raw))
    except ProtocolError:
        return
    if isinstance(decoded, LogicalMessage):
        raw[1] &= 1  # only the transactional bit of the flags is kept
    assert encode(decoded) == bytes(raw)  # whatever decodes, decoded every byte faithfully

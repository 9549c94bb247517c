"""What one dead letter stores is bounded, and its COPY data is binary (no escaping)."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc

import orjson

from cdc_relay import deadletters
from cdc_relay.deadletters import FIELD_LIMIT, PREFIX_CHARS, DeadLetter, bounded_row, copy_tuple


def test_small_fields_are_kept_whole_and_nul_free() -> None:
    row = {"id": "1", "payload": '{"a": "x\x00y"}', "headers": None, "values": ["a\x00", None]}
    assert bounded_row(row) == {
        "id": "1",
        "payload": '{"a": "x\ufffdy"}',
        "headers": None,
        "values": ["a\ufffd", None],
    }


def test_a_field_over_the_bound_keeps_prefix_size_and_hash() -> None:
    payload = "\x01" * (FIELD_LIMIT + 1)
    out = bounded_row({"id": "1", "payload": payload, "headers": "{}"})
    data = payload.encode()
    assert out == {
        "id": "1",
        "payload": {
            "prefix": payload[:PREFIX_CHARS],
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
        "headers": "{}",
        "truncated": ["payload"],
    }
    # Exactly at the bound (in UTF-8 bytes, not characters) it is kept whole.
    at_bound = "é" * (FIELD_LIMIT // 2)
    assert bounded_row({"payload": at_bound}) == {"payload": at_bound}
    over = bounded_row({"payload": at_bound + "é"})
    assert over["truncated"] == ["payload"] and over["payload"]["size"] == FIELD_LIMIT + 2


def test_list_values_are_bounded_one_by_one() -> None:
    big = "\\" * (FIELD_LIMIT * 2)
    out = bounded_row({"values": ["ok", big, None], "columns": ["a", "b", "c"]})
    assert out["values"][0] == "ok" and out["values"][2] is None
    assert out["values"][1]["size"] == FIELD_LIMIT * 2
    assert out["truncated"] == ["values[1]"]


def test_a_dead_letter_bounds_its_row_and_reason_when_made() -> None:
    letter = DeadLetter("id\x00", "r" * 10_000, {"payload": '"' * 10_000_000}, 5)
    assert letter.outbox_id == "id\ufffd"
    assert len(letter.reason) == deadletters.REASON_CHARS + 3
    assert letter.row["truncated"] == ["payload"]
    assert len(orjson.dumps(letter.row)) < 2 * PREFIX_CHARS + 200


def test_copy_tuple_is_the_binary_copy_format() -> None:
    letter = DeadLetter(None, "why", {"a": "\\\"'\n"}, 0x1_0000_0010)
    row = orjson.dumps(letter.row)
    expected = (
        struct.pack("!h", 4)
        + struct.pack("!i", -1)
        + struct.pack("!i", 3)
        + b"why"
        + struct.pack("!i", len(row) + 1)
        + b"\x01"
        + row
        + struct.pack("!i", 8)
        + struct.pack("!Q", 0x1_0000_0010)
    )
    assert copy_tuple(letter) == expected


def test_a_value_json_cannot_carry_is_stored_as_a_note_not_raised() -> None:
    letter = DeadLetter("1", "r", {}, 1)
    letter.row = {"n": 2**70}  # orjson refuses integers over 64 bits
    data = copy_tuple(letter)
    assert b"unserializable" in data


def test_escape_heavy_rows_cost_memory_in_proportion_to_what_is_stored() -> None:
    """The old writer built a text-array literal: ~300 bytes per quote or backslash."""
    shapes = {
        "control": "\x01" * 1_000_000,
        "quotes": '"' * 1_000_000,
        "backslashes": "\\" * 1_000_000,
        "nested": "[" * 1000 + "]" * 1000,
    }
    for name, payload in shapes.items():
        tracemalloc.start()
        try:
            letter = DeadLetter(name, "unroutable", {"id": name, "payload": payload}, 1)
            copy_tuple(letter)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The UTF-8 copy hashed, plus small change; never hundreds of bytes a character.
        assert peak < 2 * len(payload) + 256 * 1024, (name, peak)

"""The LSN value type: parse and print the Postgres ``X/Y`` form, order like an int."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.lsn import MAX_LSN, Lsn, format_lsn

lsn_values = st.integers(0, 2**64 - 1)


@settings(max_examples=300)
@given(lsn_values)
def test_round_trip(value: int) -> None:
    text = str(Lsn(value))
    parsed = Lsn.parse(text)
    assert parsed == value
    assert type(parsed) is Lsn
    assert format_lsn(value) == text
    assert Lsn.parse(text.lower()) == value
    # Postgres prints no leading zeros, but reads up to 8 hex digits per half.
    high, low = text.split("/")
    assert Lsn.parse(f"{high:0>8}/{low:0>8}") == value


@settings(max_examples=200)
@given(lsn_values)
def test_text_form_is_upper_hex_halves_without_padding(value: int) -> None:
    high, low = str(Lsn(value)).split("/")
    assert high == f"{value >> 32:X}"
    assert low == f"{value & 0xFFFFFFFF:X}"
    assert repr(Lsn(value)) == f"Lsn('{high}/{low}')"


@settings(max_examples=200)
@given(lsn_values, lsn_values)
def test_orders_like_the_integer_not_like_the_text(a: int, b: int) -> None:
    la, lb = Lsn.parse(format_lsn(a)), Lsn.parse(format_lsn(b))
    assert (la < lb) == (a < b)
    assert (la == lb) == (a == b)
    assert max(la, lb) == max(a, b)


def test_known_values() -> None:
    assert Lsn.parse("16/B374D848") == 0x16_B374_D848
    assert str(Lsn(0x16_B374_D848)) == "16/B374D848"
    assert Lsn.parse("0/0") == 0
    assert str(Lsn()) == "0/0"
    assert Lsn.parse("FFFFFFFF/FFFFFFFF") == MAX_LSN == 2**64 - 1
    assert str(Lsn(MAX_LSN)) == "FFFFFFFF/FFFFFFFF"
    assert str(Lsn(0x1_0000_000A)) == "1/A"
    assert Lsn.parse("0/1576620") == 0x1576620
    assert repr(Lsn(1)) == "Lsn('0/1')"


def test_ordering_examples() -> None:
    assert Lsn.parse("1/0") > Lsn.parse("0/FFFFFFFF")
    assert Lsn.parse("9/0") < Lsn.parse("10/0")  # "9/0" > "10/0" as text
    assert Lsn.parse("0/A") > Lsn.parse("0/9")
    texts = ["10/0", "9/FFFFFFFF", "0/1", "A/0", "0/10"]
    assert [str(x) for x in sorted(map(Lsn.parse, texts))] == [
        "0/1",
        "0/10",
        "9/FFFFFFFF",
        "A/0",
        "10/0",
    ]


def test_is_an_int() -> None:
    lsn = Lsn.parse("1/2")
    assert isinstance(lsn, int)
    assert lsn == (1 << 32) + 2
    assert hash(lsn) == hash((1 << 32) + 2)
    assert {lsn: "x"}[(1 << 32) + 2] == "x"
    assert lsn + 1 == (1 << 32) + 3
    assert Lsn(lsn) == lsn


def test_surrounding_whitespace_is_tolerated() -> None:
    assert Lsn.parse(" 16/B374D848\n") == 0x16_B374_D848


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "0",
        "/",
        "/1",
        "1/",
        "x/1",
        "1/x",
        "g/0",
        "1/2/3",
        "1//2",
        "123456789/0",  # 9 hex digits: Postgres rejects more than 8 per half
        "0/123456789",
        "-1/0",
        "0/-1",
        "+1/0",
        "0/+1",
        "0x1/0",
        "0/0x1",
        "1_0/0",
        "0/1_0",
        "1 /2",
        "1/ 2",
        "1.5/0",
        "\u0661/0",  # ARABIC-INDIC DIGIT ONE: int() takes it, Postgres does not
        "0/\uff11",  # FULLWIDTH DIGIT ONE
    ],
)
def test_invalid_text_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="LSN"):
        Lsn.parse(text)


@pytest.mark.parametrize("value", [-1, 2**64, 2**70, -(2**64)])
def test_out_of_range_raises_value_error(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Lsn(value)


def test_bounds_are_accepted() -> None:
    assert Lsn(0) == 0
    assert Lsn(MAX_LSN) == MAX_LSN


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0/0"),
        (1, "0/1"),
        (0xFFFFFFFF, "0/FFFFFFFF"),
        (1 << 32, "1/0"),
        (0x16_B374_D848, "16/B374D848"),
        (MAX_LSN, "FFFFFFFF/FFFFFFFF"),
    ],
)
def test_format_lsn(value: int, text: str) -> None:
    assert format_lsn(value) == text
    assert format_lsn(Lsn(value)) == text
    assert str(Lsn(value)) == text

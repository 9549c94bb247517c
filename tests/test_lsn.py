"""The LSN value type."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_relay.lsn import Lsn, format_lsn


@given(st.integers(0, 2**64 - 1))
def test_round_trip(value: int) -> None:
    text = str(Lsn(value))
    assert Lsn.parse(text) == value
    assert format_lsn(value) == text


def test_postgres_form_and_order() -> None:
    assert str(Lsn.parse("16/B374D848")) == "16/B374D848"
    assert Lsn.parse("0/0") == 0
    assert Lsn.parse("1/0") > Lsn.parse("0/FFFFFFFF")
    assert repr(Lsn(1)) == "Lsn('0/1')"


@pytest.mark.parametrize("text", ["", "0", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0"])
def test_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        Lsn.parse(text)


def test_out_of_range() -> None:
    with pytest.raises(ValueError):
        Lsn(2**64)
    with pytest.raises(ValueError):
        Lsn(-1)

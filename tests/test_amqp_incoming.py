"""The confirm channel's incoming frames decoded by hand, checked against pamqp's decoding."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from cdc_relay.amqp import incoming
from cdc_relay.amqp.connection import Connection
from cdc_relay.amqp.window import PublishFailed


def decode(data: bytes) -> Any:
    """One marshalled frame through incoming.decode, as Connection.data_received calls it."""
    assert data[-1] == 0xCE
    return incoming.decode(data[0], data, 7, len(data) - 1)


short = st.text(max_size=20).filter(lambda s: len(s.encode()) <= 255)
exchanges = st.from_regex(r"[a-zA-Z0-9\-_.:]{0,127}", fullmatch=True)  # pamqp's domain
tags = st.integers(min_value=0, max_value=(1 << 63) - 1)  # what pamqp encodes


@settings(max_examples=300, deadline=None)
@given(tags, st.booleans(), st.booleans(), st.integers(min_value=0, max_value=65535))
def test_acks_and_nacks_decode_as_pamqp_does(
    tag: int, multiple: bool, requeue: bool, channel: int
) -> None:
    ack = decode(pamqp_frame.marshal(spec.Basic.Ack(tag, multiple), channel))
    assert ack == incoming.Ack(tag, multiple)
    nack = decode(pamqp_frame.marshal(spec.Basic.Nack(tag, multiple, requeue), channel))
    assert nack == incoming.Nack(tag, multiple)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=65535), short, exchanges, short)
def test_a_return_decodes_as_pamqp_does(code: int, text: str, exchange: str, key: str) -> None:
    data = pamqp_frame.marshal(spec.Basic.Return(code, text, exchange, key), 1)
    theirs = pamqp_frame.unmarshal(data)[2]
    ours = decode(data)
    assert isinstance(theirs, spec.Basic.Return)
    assert ours == incoming.Return(
        theirs.reply_code, theirs.reply_text, theirs.exchange, theirs.routing_key
    )


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 31), (1 << 31) - 1) | short,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short, inner, max_size=3),
    max_leaves=8,
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": short,
        "content_encoding": short,
        "headers": st.dictionaries(short, header_values, max_size=4),
        "delivery_mode": st.integers(1, 2),
        "priority": st.integers(0, 9),
        "correlation_id": short,
        "reply_to": short,
        "expiration": st.integers(0, 10**9).map(str),
        "message_id": short,
        "timestamp": st.integers(0, 2**32).map(lambda s: datetime.fromtimestamp(s, UTC)),
        "message_type": short,
        "user_id": short,
        "app_id": short,
    },
)


@settings(max_examples=400, deadline=None)
@given(properties, st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_a_content_header_yields_the_message_id_and_body_size_pamqp_reads(
    props: dict[str, Any], body_size: int
) -> None:
    data = pamqp_frame.marshal(ContentHeader(0, body_size, spec.Basic.Properties(**props)), 1)
    theirs = pamqp_frame.unmarshal(data)[2]
    assert isinstance(theirs, ContentHeader)
    assert decode(data) == incoming.ReturnedHeader(theirs.body_size, theirs.properties.message_id)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_a_body_frame_is_its_size(body: bytes) -> None:
    assert decode(pamqp_frame.marshal(ContentBody(body), 1)) == incoming.Body(len(body))


def test_other_frames_are_left_to_pamqp() -> None:
    for method in (
        spec.Channel.Close(404, "NOT_FOUND", 60, 40),
        spec.Connection.Blocked("low on memory"),
        spec.Confirm.SelectOk(),
        spec.Basic.Deliver("ctag", 1, False, "ex", "rk"),
    ):
        assert decode(pamqp_frame.marshal(method, 1)) is None
    assert decode(b"\x08\x00\x00\x00\x00\x00\x00\xce") == incoming.HEARTBEAT


@pytest.mark.parametrize(
    "data",
    [
        # basic.ack one byte short
        b"\x01\x00\x01\x00\x00\x00\x0c\x00\x3c\x00\x50" + b"\x00" * 8 + b"\xce",
        # basic.return whose routing key runs past the frame
        b"\x01\x00\x01\x00\x00\x00\x09\x00\x3c\x00\x32\x01\x38\x00\x00\x09\xce",
        # content header naming a message id it does not hold
        b"\x02\x00\x01\x00\x00\x00\x0e\x00\x3c\x00\x00" + b"\x00" * 8 + b"\x00\x80\xce",
    ],
)
def test_a_malformed_frame_of_a_decoded_kind_is_refused(data: bytes) -> None:
    with pytest.raises((incoming.FrameError, IndexError)):
        decode(data)


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data",
    [
        pamqp_frame.marshal(spec.Basic.Ack(1, False), 1)[:-1] + b"\x00",  # no frame end
        b"\x01\x00\x01\x00\x00\x00\x05\x00\x3c\x00\x50\x00\xce",  # a truncated ack
        pamqp_frame.marshal(spec.Basic.Return(312, "x", "e", "k"), 1).replace(b"x", b"\xff"),
    ],
)
async def test_a_connection_given_a_malformed_frame_fails_as_a_protocol_error(data: bytes) -> None:
    lost: list[PublishFailed] = []
    received: list[Any] = []
    connection = Connection(lambda ch, v: received.append(v), lost.append, heartbeat=0)
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    connection.opened = True
    connection.data_received(data)
    assert received == []
    assert len(lost) == 1 and lost[0].code == "protocol_error", lost


@pytest.mark.asyncio
async def test_a_connection_splits_frames_across_reads_and_hands_them_out_in_order() -> None:
    frames: list[Frame] = [
        spec.Basic.Ack(3, True),
        spec.Basic.Return(312, "NO_ROUTE", "ex", "rk"),
        ContentHeader(0, 4, spec.Basic.Properties(message_id="m-1", headers={"a": 1})),
        ContentBody(b"body"),
        spec.Basic.Nack(4, False),
        spec.Channel.Close(406, "PRECONDITION_FAILED", 60, 40),
    ]
    data = b"".join(pamqp_frame.marshal(f, 1) for f in frames)
    received: list[Any] = []
    connection = Connection(lambda ch, v: received.append(v), None, heartbeat=0)
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    connection.opened = True
    for start in range(0, len(data), 7):  # 7-byte reads: every frame split somewhere
        connection.data_received(data[start : start + 7])
    assert received[:5] == [
        incoming.Ack(3, True),
        incoming.Return(312, "NO_ROUTE", "ex", "rk"),
        incoming.ReturnedHeader(4, "m-1"),
        incoming.Body(4),
        incoming.Nack(4, False),
    ]
    assert isinstance(received[5], spec.Channel.Close)
    assert connection._buffer == bytearray()

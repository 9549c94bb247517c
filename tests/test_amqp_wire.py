"""Hand-encoded publish frames decode to exactly what pamqp would send.

(pamqp writes header tables with sorted keys; we keep the caller's order, so the
comparison is frame by frame after decoding, plus the exact total length.)"""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp import encode as pamqp_encode
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from cdc_relay.amqp import AmqpAddress
from cdc_relay.amqp_wire import PublishEncoder, encode_value
from cdc_relay.envelope import Envelope


def reference(envelope: Envelope, channel: int, frame_max: int) -> bytes:
    properties = spec.Basic.Properties(
        content_type=envelope.content_type,
        content_encoding=envelope.content_encoding,
        headers=envelope.headers or None,
        delivery_mode=envelope.delivery_mode,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        expiration=envelope.expiration,
        priority=envelope.priority,
        user_id=envelope.user_id,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        message_type=envelope.type,
        app_id=envelope.app_id,
    )
    frames = [
        pamqp_frame.marshal(
            spec.Basic.Publish(
                exchange=envelope.exchange, routing_key=envelope.routing_key, mandatory=True
            ),
            channel,
        ),
        pamqp_frame.marshal(ContentHeader(0, len(envelope.body), properties), channel),
    ]
    chunk = frame_max - 8
    for start in range(0, len(envelope.body), chunk):
        frames.append(
            pamqp_frame.marshal(ContentBody(envelope.body[start : start + chunk]), channel)
        )
    return b"".join(frames)


short = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
header_values = st.one_of(
    short, st.integers(-(2**31), 2**31 - 1), st.booleans(), st.none(), st.lists(short, max_size=3)
)
envelopes = st.builds(
    Envelope,
    exchange=st.from_regex(r"[a-zA-Z0-9\-_.:]{0,20}", fullmatch=True),
    routing_key=short,
    body=st.binary(max_size=3000),
    message_id=short,
    type=st.one_of(st.none(), short),
    headers=st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10),
        header_values,
        max_size=5,
    ),
    timestamp=st.one_of(
        st.none(),
        st.datetimes(
            min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ).map(lambda d: d.replace(microsecond=0)),
    ),
    content_encoding=st.one_of(st.none(), st.just("utf-8")),
    correlation_id=st.one_of(st.none(), short),
    reply_to=st.one_of(st.none(), short),
    expiration=st.one_of(st.none(), st.integers(0, 2**32 - 1).map(str)),
    priority=st.one_of(st.none(), st.integers(0, 255)),
    user_id=st.one_of(st.none(), short),
)


@settings(max_examples=300, deadline=None)
@given(envelopes, st.sampled_from([4096, 131072]))
def test_publish_frames_match_pamqp(envelope: Envelope, frame_max: int) -> None:
    encoder = PublishEncoder(1, frame_max)
    expected = reference(envelope, 1, frame_max)
    assert same_frames(encoder.encode(envelope), expected)
    # The cached method frame gives the same frames the second time.
    assert same_frames(encoder.encode(envelope), expected)


def frames_of(data: bytes) -> list[tuple[int, object]]:
    out = []
    while data:
        consumed, channel, value = pamqp_frame.unmarshal(data)
        data = data[consumed:]
        if isinstance(value, ContentHeader):
            value = (value.body_size, dict(value.properties))
        elif isinstance(value, ContentBody):
            value = value.value
        else:
            value = dict(value)
        out.append((channel, value))
    return out


def same_frames(ours: bytes, theirs: bytes) -> bool:
    return len(ours) == len(theirs) and frames_of(ours) == frames_of(theirs)


def test_typical_event_matches() -> None:
    envelope = Envelope(
        exchange="outbox",
        routing_key="order.OrderCreated",
        body=b'{"total": 12.5}',
        message_id="0b9c6f3e-0000-4000-8000-000000000001",
        type="OrderCreated",
        headers={"aggregate_type": "order", "aggregate_id": "42", "event_type": "OrderCreated"},
        timestamp=datetime(2026, 11, 23, 10, 11, 12, tzinfo=UTC),
    )
    assert same_frames(PublishEncoder(1, 131072).encode(envelope), reference(envelope, 1, 131072))


def test_amqp_url_parsing() -> None:
    a = AmqpAddress.parse("amqp://us%40er:p%2Fw@mq.example:5673/v%2Fhost")
    assert (a.host, a.port, a.user, a.password, a.vhost) == (
        "mq.example",
        5673,
        "us@er",
        "p/w",
        "v/host",
    )
    d = AmqpAddress.parse("amqp://localhost")
    assert (d.port, d.user, d.password, d.vhost) == (5672, "guest", "guest", "/")


def test_over_long_names_are_refused_even_after_caching() -> None:
    encoder = PublishEncoder(1, 131072)
    long_key = "k" * 256
    for _ in range(2):  # the second time would come from a cache if one kept it
        with pytest.raises(ValueError, match="255"):
            encoder.encode(Envelope("ex", "rk", b"{}", "id", "T", {long_key: "v"}))
        with pytest.raises(ValueError, match="255"):
            encoder.encode(Envelope("ex", "rk", b"{}", "id", "T" * 256, {}))


def test_encoding_caches_stay_bounded() -> None:
    from cdc_relay import amqp_wire

    encoder = PublishEncoder(1, 131072)
    for n in range(amqp_wire._CACHE_LIMIT + 10):
        data = encoder.encode(Envelope("ex", "rk", b"{}", "id", f"T{n}", {f"h{n}": "v"}))
        assert data == reference(
            Envelope("ex", "rk", b"{}", "id", f"T{n}", {f"h{n}": "v"}), 1, 131072
        )
    assert len(amqp_wire._short_strings) <= amqp_wire._CACHE_LIMIT
    assert len(amqp_wire._table_keys) <= amqp_wire._CACHE_LIMIT


# -- header values that deliberately differ from pamqp: floats, nested key length ----------

json_floats = st.floats(allow_nan=False)
nested_values = st.recursive(
    st.one_of(json_floats, short, st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3),
    ),
    max_leaves=12,
)


def decoded_headers(envelope: Envelope) -> dict[str, object]:
    frames = frames_of(PublishEncoder(1, 131072).encode(envelope))
    _, (_, properties) = frames[1]  # type: ignore[misc]
    return properties["headers"]  # type: ignore[index,no-any-return]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), nested_values, max_size=4))
def test_header_values_round_trip_exactly_through_pamqps_decoder(headers: dict) -> None:
    """Floats go out as AMQP doubles ('d') at every depth: the consumer gets the same number."""
    envelope = Envelope("ex", "rk", b"{}", "id", "T", headers)
    assert (decoded_headers(envelope) or {}) == headers  # no headers: no property at all


def test_a_float_that_float32_would_change() -> None:
    headers = {"price": 0.1, "nested": {"rate": 1e300, "list": [2.5e-310, -0.0]}}
    assert decoded_headers(Envelope("ex", "rk", b"{}", "id", "T", headers)) == headers
    assert pamqp_encode.encode_table_value(0.1)[:1] == b"f"  # what pamqp alone would send
    encoded = PublishEncoder(1, 131072).encode(Envelope("ex", "rk", b"{}", "id", "T", {"p": 0.1}))
    assert b"\x01pd" + struct.pack("!d", 0.1) in encoded


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.one_of(short, st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none()),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3).map(
                lambda d: dict(sorted(d.items()))
            ),
        ),
        max_leaves=12,
    )
)
def test_nested_values_without_floats_are_pamqps_bytes(value: object) -> None:
    """Nested tables (keys in pamqp's sorted order) and arrays: byte-identical to pamqp."""
    assert encode_value(value) == pamqp_encode.encode_table_value(value)  # type: ignore[arg-type]


def test_nested_keys_over_128_bytes_are_refused_not_truncated() -> None:
    encoder = PublishEncoder(1, 131072)
    ok = {"outer": {"k" * 128: 1, "list": [{"é" * 64: 2}]}}
    assert decoded_headers(Envelope("ex", "rk", b"{}", "id", "T", ok)) == ok
    for bad in ({"outer": {"k" * 129: 1}}, {"outer": [{"é" * 65: 1}]}):
        with pytest.raises(ValueError, match="128 bytes"):
            encoder.encode(Envelope("ex", "rk", b"{}", "id", "T", bad))

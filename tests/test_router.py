"""Router: outbox row -> envelope, exactly the mapping the README documents.

Pure unit tests. "Unmappable" matters: such a row is dead-lettered and the
stream goes on; anything the router lets through must also be something
the publisher can put on the wire, or the row would fail the session forever.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pamqp import encode as pamqp_encode

from cdc_relay.amqp_wire import encode_table
from cdc_relay.celery_message import CELERY_REPR_MAXSIZE, TASK_AGGREGATE_TYPE, _fallback_repr
from cdc_relay.cli_options import check_routing_key
from cdc_relay.config import Settings
from cdc_relay.envelope import (
    MAX_HEADER_DEPTH,
    MAX_NESTED_KEY_BYTES,
    Envelope,
    _header_value_size,
    parse_timestamptz,
)
from cdc_relay.errors import ConfigError
from cdc_relay.router import DEFAULT_EXCHANGE_PATTERN, Router, exchange_allowed
from cdc_relay.rows import OutboxRow, OutboxSchemaError, RowReader, UnmappableRow

COLUMNS = [
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
    "exchange",
    "routing_key",
    "created_at",
]
REQUIRED = ["id", "aggregate_type", "aggregate_id", "event_type", "payload"]
ROW_ID = "0b9c6f3e-0000-4000-8000-000000000001"
CELERY_PAYLOAD = b'{"args": [1, "x"], "kwargs": {"k": true}}'


def row(**overrides: object) -> OutboxRow:
    values: dict[str, object] = {
        "id": ROW_ID,
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
        "payload": b'{"total": 12.5}',
        "headers": b'{"tenant": "acme"}',
        "exchange": None,
        "routing_key": None,
        "created_at": "2026-11-23 10:11:12.123456+00",
    }
    values.update(overrides)
    return OutboxRow(**values)  # type: ignore[arg-type]


def celery_route(**overrides: object) -> Envelope:
    overrides.setdefault("payload", CELERY_PAYLOAD)
    return Router(message_format="celery").route(row(**overrides))


def assert_on_the_wire(env: Envelope) -> None:
    """The envelope fits AMQP 0-9-1: short strings, field table, uint64 timestamp."""
    for name in (
        "exchange",
        "routing_key",
        "message_id",
        "type",
        "content_type",
        "content_encoding",
        "correlation_id",
        "app_id",
    ):
        value = getattr(env, name)
        if value is not None:
            assert len(value.encode()) <= 255, name
    for key in env.headers:
        assert len(key.encode()) <= 255
    # the publisher's own encoder (header floats are AMQP doubles, which pamqp
    # encodes as float32), so "fits" means "the relay can put it on the wire"
    encode_table(env.headers)
    if env.timestamp is not None:
        assert env.timestamp.tzinfo is not None
        pamqp_encode.timestamp(env.timestamp)
    assert isinstance(env.body, bytes)


# -- the default "event" mapping --------------------------------------------------------


def test_default_event_mapping_is_exactly_design_section_4() -> None:
    payload = b'{"total": 12.5}'
    env = Router().route(row(payload=payload))
    assert env == Envelope(
        exchange="outbox",
        routing_key="order.OrderCreated",
        body=payload,
        message_id=ROW_ID,
        type="OrderCreated",
        headers={
            "tenant": "acme",
            "aggregate_type": "order",
            "aggregate_id": "42",
            "event_type": "OrderCreated",
        },
        timestamp=datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC),
        content_type="application/json",
        content_encoding=None,
        correlation_id=None,
        app_id="cdc-relay",
        delivery_mode=2,
    )
    assert env.timestamp is not None and env.timestamp.utcoffset() == timedelta(0)
    assert_on_the_wire(env)


def test_body_is_the_payload_object_itself() -> None:
    """No parsing, no re-encoding: whitespace, key order, escapes all kept."""
    payload = b'{ "b" : 1,"a": [1, 2, {"c": "\xc3\xbc\\u00fc"}], "n": 1.50e2 }'
    env = Router().route(row(payload=payload))
    assert env.body is payload


def test_body_is_not_validated_as_json_in_event_format() -> None:
    """The payload is jsonb; the router does not spend time re-checking it."""
    payload = b"not json at all"
    assert Router().route(row(payload=payload)).body is payload


def test_exchange_default_option_and_per_row_override() -> None:
    assert Router().route(row()).exchange == "outbox"
    assert Router(exchange="events").route(row()).exchange == "events"
    assert Router(exchange="events").route(row(exchange="other")).exchange == "other"


def test_per_row_empty_exchange_means_the_default_exchange_not_no_override() -> None:
    assert Router(exchange="events").route(row(exchange="")).exchange == ""


def test_per_row_routing_key_overrides_the_template() -> None:
    env = Router(exchange="events").route(row(exchange="other", routing_key="x.y"))
    assert (env.exchange, env.routing_key) == ("other", "x.y")
    # An explicit empty routing key is a routing key too (fanout/headers exchanges).
    assert Router().route(row(routing_key="")).routing_key == ""


def test_per_row_routing_key_skips_template_rendering() -> None:
    """The template would fail on this row, but the row brings its own key."""
    router = Router(routing_key_template="{payload[region]}")
    env = router.route(row(payload=b"[1]", routing_key="fixed"))
    assert env.routing_key == "fixed"


def test_headers_are_row_headers_plus_the_three_aggregate_fields() -> None:
    headers = b'{"tenant": "acme", "n": 3, "ok": true, "none": null, "nested": {"a": [1, "b"]}}'
    env = Router().route(row(headers=headers))
    assert env.headers == {
        "tenant": "acme",
        "n": 3,
        "ok": True,
        "none": None,
        "nested": {"a": [1, "b"]},
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
    }
    assert_on_the_wire(env)


@pytest.mark.parametrize("headers", [b"{}", None])
def test_no_row_headers(headers: bytes | None) -> None:
    env = Router().route(row(headers=headers))
    assert env.headers == {
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
    }


def test_row_values_win_over_row_headers_of_the_same_name() -> None:
    env = Router().route(row(headers=b'{"event_type": "Forged", "aggregate_id": "0"}'))
    assert env.headers["event_type"] == "OrderCreated"
    assert env.headers["aggregate_id"] == "42"


def test_each_envelope_gets_its_own_headers_dict() -> None:
    router = Router()
    first = router.route(row(headers=b"{}"))
    first.headers["mutated"] = True
    assert "mutated" not in router.route(row(headers=b"{}")).headers


# -- routing-key templates ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{aggregate_type}.{event_type}", "order.OrderCreated"),
        ("evt.{aggregate_type}.{aggregate_id}", "evt.order.42"),
        ("{aggregate_id}", "42"),
        ("{id}", ROW_ID),
        ("static", "static"),
        ("", ""),
        ("r.{payload[region]}", "r.eu"),
        ("r.{payload[region]}.{event_type}", "r.eu.OrderCreated"),
        ("{payload[address][city]}", "Lyon"),
        ("{payload[items][0]}", "7"),
        ("{payload[count]}", "3"),
        ("{{literal}}.{event_type}", "{literal}.OrderCreated"),
        ("{event_type}.{aggregate_type}", "OrderCreated.order"),
    ],
)
def test_routing_key_templates(template: str, expected: str) -> None:
    payload = b'{"region": "eu", "address": {"city": "Lyon"}, "items": [7, 8], "count": 3}'
    router = Router(routing_key_template=template)
    assert router.route(row(payload=payload)).routing_key == expected
    assert router.render_routing_key(row(payload=payload)) == expected


def test_template_values_are_not_reinterpreted_as_templates() -> None:
    r = row(aggregate_type="{event_type}", aggregate_id="{payload[x]}")
    assert Router().route(r).routing_key == "{event_type}.OrderCreated"
    custom = Router(routing_key_template="{aggregate_type}/{aggregate_id}")
    assert custom.route(r).routing_key == "{event_type}/{payload[x]}"


def test_template_without_payload_does_not_parse_the_payload() -> None:
    router = Router(routing_key_template="{aggregate_type}-{aggregate_id}")
    assert router.route(row(payload=b"{broken")).routing_key == "order-42"


@pytest.mark.parametrize(
    ("template", "overrides", "message"),
    [
        ("{nope}", {}, "unknown field"),
        ("{exchange}", {}, "unknown field"),
        ("{payload[region]}", {}, "cannot be rendered"),  # key missing in the payload
        ("{payload[region]}", {"payload": b"[1]"}, "cannot be rendered"),
        ("{payload[region]}", {"payload": b'"text"'}, "cannot be rendered"),
        ("{payload[region]}", {"payload": b"{broken"}, "cannot be rendered"),
        ("{payload[items][5]}", {"payload": b'{"items": [1]}'}, "cannot be rendered"),
        ("{payload.region}", {"payload": b'{"region": "eu"}'}, "cannot be rendered"),
        ("{aggregate_id.real}", {}, "cannot be rendered"),
        ("{0}", {}, "cannot be rendered"),
        ("{}", {}, "cannot be rendered"),
        ("{aggregate_id:d}", {}, "cannot be rendered"),
    ],
)
def test_unrenderable_templates_are_unmappable(
    template: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(UnmappableRow, match=message):
        Router(routing_key_template=template).route(row(**overrides))


def test_malformed_template_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError):
        Router(routing_key_template="{aggregate_type")


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        Router(message_format="xml")


# -- unmappable rows ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [b"[1, 2]", b'"text"', b"42", b"null", b"true", b"{not json", b"", b'{"a": 1'],
)
def test_headers_must_be_a_json_object(headers: bytes) -> None:
    with pytest.raises(UnmappableRow, match="headers"):
        Router().route(row(headers=headers))


@pytest.mark.parametrize("exchange", ["has space", "x" * 128, "é", "orders\n", "a/b"])
def test_invalid_exchange_names_are_unmappable(exchange: str) -> None:
    with pytest.raises(UnmappableRow, match="invalid exchange name"):
        Router().route(row(exchange=exchange))
    with pytest.raises(UnmappableRow, match="invalid exchange name"):
        Router(message_format="celery").route(
            row(exchange=exchange, payload=b'{"args": [], "kwargs": {}}')
        )


@pytest.mark.parametrize("exchange", ["amq.topic", "a-b_c.d:e", "x" * 127])
def test_valid_exchange_names(exchange: str) -> None:
    assert Router().route(row(exchange=exchange)).exchange == exchange


def test_routing_key_length_limit_is_255_bytes() -> None:
    assert Router().route(row(routing_key="k" * 255)).routing_key == "k" * 255
    with pytest.raises(UnmappableRow, match="255"):
        Router().route(row(routing_key="k" * 256))
    # Bytes, not characters: 128 two-byte characters are 256 bytes.
    with pytest.raises(UnmappableRow, match="255"):
        Router().route(row(routing_key="é" * 128))


def test_rendered_routing_key_length_limit() -> None:
    with pytest.raises(UnmappableRow, match="255"):
        Router().route(row(aggregate_type="a" * 200, event_type="e" * 55))
    assert (
        len(Router().route(row(aggregate_type="a" * 200, event_type="e" * 54)).routing_key) == 255
    )
    with pytest.raises(UnmappableRow, match="255"):
        Router(routing_key_template="{payload[k]}").route(
            row(payload=b'{"k": "%s"}' % (b"x" * 300))
        )


@pytest.mark.parametrize(
    "headers",
    [
        b'{"n": 9223372036854775808}',  # above int64: valid jsonb, no AMQP integer type
        b'{"n": 18446744073709551615}',
        b'{"nested": {"n": [9223372036854775808]}}',
        b'{"%s": 1}' % (b"k" * 256),  # field name is a short string
        b'{"%s": 1}' % ("é" * 128).encode(),  # 128 characters, 256 bytes
    ],
)
def test_headers_the_wire_cannot_carry_are_unmappable(headers: bytes) -> None:
    """Otherwise the publisher fails on encoding, the session restarts, forever."""
    with pytest.raises(UnmappableRow, match="header"):
        Router().route(row(headers=headers))
    with pytest.raises(UnmappableRow, match="header"):
        celery_route(headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        b'{"n": 9223372036854775807, "m": -9223372036854775808}',
        b'{"f": 3.4e38, "g": -0.0, "h": 1e-300}',
        b'{"f": 1e39}',  # beyond float32: header floats are AMQP doubles (issue 9)
        b'{"f": [-1e300]}',
        b'{"%s": 1}' % (b"k" * 255),
        b'{"deep": {"deeper": {"deepest": [1, [2, {"x": null}]]}}}',
    ],
)
def test_headers_at_the_wire_limits_are_fine(headers: bytes) -> None:
    env = Router().route(row(headers=headers))
    assert_on_the_wire(env)


@pytest.mark.parametrize(
    ("headers", "changed_to"),
    [
        (b'{"n": -9223372036854775809}', "int64"),  # was -9.223372036854776e+18
        (b'{"n": 18446744073709551616}', "int64"),  # was 1.8446744073709552e+19
        (b'{"n": 9007199254740993.0}', "9007199254740992.0"),
        (b'{"n": 1.00000000000000000001}', "1.0"),
        (b'{"n": 1e-400}', "0.0"),
        (b'{"ok": 0.5, "n": {"x": [1, 0.30000000000000000001]}}', "0.3"),
    ],
)
def test_header_numbers_a_double_would_change_are_unmappable(
    headers: bytes, changed_to: str
) -> None:
    """Before, these arrived silently as another number; now the row is dead-lettered."""
    for route in (
        lambda: Router().route(row(headers=headers)),
        lambda: celery_route(headers=headers),
    ):
        with pytest.raises(UnmappableRow, match="header 'n'") as info:
            route()
        assert changed_to in str(info.value)


@pytest.mark.parametrize(
    ("headers", "value"),
    [
        (b'{"n": 0.1}', 0.1),  # not the exact decimal, but the double every reader makes
        (b'{"n": 1.5}', 1.5),
        (b'{"n": 1e3}', 1000.0),
        (b'{"n": 1E-3}', 0.001),
        (b'{"n": 2.5e-310}', 2.5e-310),
        (b'{"n": -0.0}', -0.0),
        (b'{"n": 9007199254740992.0}', 9007199254740992.0),
        (b'{"n": 1.7976931348623157e308}', 1.7976931348623157e308),
        (b'{"n": [0.1, {"m": 123.456}]}', [0.1, {"m": 123.456}]),
    ],
)
def test_header_numbers_a_double_holds_pass_unchanged(headers: bytes, value: object) -> None:
    env = Router().route(row(headers=headers))
    assert env.headers["n"] == value
    assert_on_the_wire(env)


def test_event_type_and_id_must_fit_a_short_string() -> None:
    """``type`` and ``message_id`` are AMQP short strings (255 bytes)."""
    with pytest.raises(UnmappableRow, match="event_type"):
        Router().route(row(event_type="E" * 256, routing_key="rk"))
    with pytest.raises(UnmappableRow, match="id"):
        Router().route(row(id="i" * 256))
    with pytest.raises(UnmappableRow, match="id"):
        celery_route(id="i" * 256)
    env = Router().route(row(event_type="é" * 127, id="i" * 255, routing_key="rk"))
    assert_on_the_wire(env)


# -- RowReader ------------------------------------------------------------------------


def test_row_reader_maps_by_name_with_extra_columns_and_other_order() -> None:
    names = ["extra", *reversed(COLUMNS), "another"]
    values = (
        b"?",
        *reversed([b"id-1", b"t", b"a", b"e", b'{"p": 1}', b'{"h": 2}', b"ex", b"rk", b"ts"]),
        None,
    )
    r = RowReader(names).read(values)
    assert r == OutboxRow(
        id="id-1",
        aggregate_type="t",
        aggregate_id="a",
        event_type="e",
        payload=b'{"p": 1}',
        headers=b'{"h": 2}',
        exchange="ex",
        routing_key="rk",
        created_at="ts",
    )


def test_row_reader_keeps_the_payload_bytes_object() -> None:
    payload = b'{"big": "' + b"x" * 10_000 + b'"}'
    r = RowReader(COLUMNS).read((b"i", b"t", b"a", b"e", payload, b"{}", None, None, None))
    assert r.payload is payload
    assert Router().route(r).body is payload


def test_row_reader_decodes_utf8_text() -> None:
    values = ("ü".encode(), "ağ".encode(), "日本".encode(), "é".encode(), b"{}")
    r = RowReader(REQUIRED).read(values)
    assert (r.id, r.aggregate_type, r.aggregate_id, r.event_type) == ("ü", "ağ", "日本", "é")


def test_row_reader_minimal_columns() -> None:
    r = RowReader(REQUIRED).read((b"i", b"t", b"a", b"e", b"{}"))
    assert r.headers is None and r.exchange is None
    assert r.routing_key is None and r.created_at is None
    env = Router().route(r)
    assert env.headers == {"aggregate_type": "t", "aggregate_id": "a", "event_type": "e"}
    assert env.timestamp is None
    assert env.exchange == "outbox" and env.routing_key == "t.e"


def test_row_reader_nulls_in_optional_columns() -> None:
    r = RowReader(COLUMNS).read((b"i", b"t", b"a", b"e", b"{}", None, None, None, None))
    assert (r.headers, r.exchange, r.routing_key, r.created_at) == (None, None, None, None)


@pytest.mark.parametrize("missing", REQUIRED)
def test_row_reader_rejects_a_table_without_a_required_column(missing: str) -> None:
    with pytest.raises(OutboxSchemaError, match=missing):
        RowReader([c for c in COLUMNS if c != missing])


def test_row_reader_names_every_missing_column() -> None:
    with pytest.raises(OutboxSchemaError, match="aggregate_id, event_type"):
        RowReader(["id", "aggregate_type", "payload"])
    with pytest.raises(OutboxSchemaError):
        RowReader([])


def test_schema_error_is_not_an_unmappable_row() -> None:
    assert not issubclass(OutboxSchemaError, UnmappableRow)
    assert not issubclass(UnmappableRow, OutboxSchemaError)


@pytest.mark.parametrize("column", REQUIRED)
def test_null_in_a_required_column_is_unmappable(column: str) -> None:
    values = [b"i", b"t", b"a", b"e", b"{}", b"{}", None, None, None]
    values[COLUMNS.index(column)] = None
    with pytest.raises(UnmappableRow, match="cannot read"):
        RowReader(COLUMNS).read(tuple(values))


class UnchangedToast:
    """Stands in for the decoder's unchanged-TOAST sentinel and binary values."""


@pytest.mark.parametrize("bad", [UnchangedToast(), bytearray(b"{}"), "already str", 42])
def test_non_text_values_are_unmappable(bad: object) -> None:
    """The decoder hands text as bytes; anything else cannot be an outbox value."""
    values = [b"i", b"t", b"a", b"e", b"{}", b"{}", None, None, None]
    values[COLUMNS.index("payload")] = bad
    with pytest.raises(UnmappableRow):
        RowReader(COLUMNS).read(tuple(values))
    values = [b"i", b"t", b"a", b"e", b"{}", bad, None, None, None]
    with pytest.raises(UnmappableRow):
        RowReader(COLUMNS).read(tuple(values))


def test_invalid_utf8_is_unmappable() -> None:
    with pytest.raises(UnmappableRow):
        RowReader(REQUIRED).read((b"\xff\xfe", b"t", b"a", b"e", b"{}"))


def test_short_value_tuple_is_unmappable() -> None:
    with pytest.raises(UnmappableRow):
        RowReader(COLUMNS).read((b"i", b"t", b"a"))


def test_as_dict_is_json_friendly() -> None:
    r = row(payload=b'{"a": "\xc3\xbc"}', headers=b"\xff")
    d = r.as_dict()
    assert d["payload"] == '{"a": "ü"}'
    assert d["headers"] == "\ufffd"
    assert d["id"] == ROW_ID
    orjson.dumps(d)


# -- timestamps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "2026-11-23 10:11:12.123456+00",
            datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC),
        ),
        ("2026-11-23 10:11:12+00", datetime(2026, 11, 23, 10, 11, 12, tzinfo=UTC)),
        ("2026-11-23 10:11:12.5+00", datetime(2026, 11, 23, 10, 11, 12, 500000, tzinfo=UTC)),
        ("2026-11-23 10:11:12+05:30", datetime(2026, 11, 23, 4, 41, 12, tzinfo=UTC)),
        ("2026-11-23 10:11:12-08", datetime(2026, 11, 23, 18, 11, 12, tzinfo=UTC)),
        ("1970-01-01 00:00:00+00", datetime(1970, 1, 1, tzinfo=UTC)),
        ("9999-12-31 23:59:59+00", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_parse_timestamptz(text: str, expected: datetime) -> None:
    value = parse_timestamptz(text)
    assert value == expected
    assert value is not None and value.tzinfo is not None


def test_utc_timestamps_come_back_in_utc() -> None:
    value = parse_timestamptz("2026-11-23 10:11:12.123456+00")
    assert value is not None
    assert value.utcoffset() == timedelta(0)
    assert value.replace(tzinfo=None) == datetime(2026, 11, 23, 10, 11, 12, 123456)


def test_timestamp_without_offset_is_taken_as_utc() -> None:
    """Aware, so the AMQP timestamp does not depend on the relay host's time zone."""
    value = parse_timestamptz("2026-11-23 10:11:12")
    assert value == datetime(2026, 11, 23, 10, 11, 12, tzinfo=UTC)
    assert value is not None and value.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    [
        "infinity",
        "-infinity",
        "",
        None,
        "4713-01-01 00:00:00+00 BC",
        "4713-01-01 BC",
        "294276-12-31 23:59:59+00",  # Postgres' range goes past year 9999
        "garbage",
    ],
)
def test_unparseable_timestamps_mean_no_timestamp(text: str | None) -> None:
    assert parse_timestamptz(text) is None


@pytest.mark.parametrize(
    "text",
    ["1969-12-31 23:59:59+00", "0001-01-01 00:00:00+00", "1970-01-01 00:30:00+01"],
)
def test_timestamps_before_the_epoch_mean_no_timestamp(text: str) -> None:
    """AMQP timestamps are unsigned: a pre-1970 created_at cannot be encoded."""
    assert parse_timestamptz(text) is None
    env = Router().route(row(created_at=text))
    assert env.timestamp is None
    assert_on_the_wire(env)


def test_infinity_created_at_still_routes() -> None:
    env = Router().route(row(created_at="infinity"))
    assert env.timestamp is None
    assert env.body == b'{"total": 12.5}'


# -- Celery format ------------------------------------------------------------------------


def test_celery_task_message() -> None:
    env = celery_route(event_type="app.tasks.add")
    args, kwargs, embed = orjson.loads(env.body)
    assert (args, kwargs) == ([1, "x"], {"k": True})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert env.exchange == "" and env.routing_key == "celery"
    assert env.headers == {
        "lang": "py",
        "task": "app.tasks.add",
        "id": ROW_ID,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": ROW_ID,
        "parent_id": None,
        "argsrepr": "(1, 'x')",
        "kwargsrepr": "{'k': True}",
        "origin": "cdc-relay",
        "ignore_result": False,
        "tenant": "acme",  # the row's own headers ride along
    }
    assert env.message_id == env.correlation_id == ROW_ID
    assert env.content_type == "application/json"
    assert env.content_encoding == "utf-8"
    assert env.delivery_mode == 2
    assert env.type is None
    assert env.timestamp == datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC)
    assert_on_the_wire(env)


def test_celery_message_matches_what_celery_itself_sends() -> None:
    """Compare with Celery's own protocol-2 message for the same call."""
    celery = pytest.importorskip("celery")
    app = celery.Celery("t", broker="memory://", set_as_current=False)
    theirs = app.amqp.as_task_v2(ROW_ID, "app.tasks.add", args=(1, "x"), kwargs={"k": True})
    ours = celery_route(event_type="app.tasks.add", headers=b"{}")
    # Newer Celery adds optional stamping/replacement fields the worker defaults.
    optional = {"replaced_task_nesting", "stamped_headers", "stamps"}
    assert set(theirs.headers) - set(ours.headers) <= optional
    assert set(ours.headers) <= set(theirs.headers)
    for key, value in ours.headers.items():
        if key != "origin":
            assert theirs.headers[key] == value, key
    args, kwargs, embed = theirs.body
    assert orjson.loads(ours.body) == [list(args), kwargs, embed]
    assert theirs.properties["correlation_id"] == ours.correlation_id


def test_celery_defaults_and_overrides() -> None:
    # The event-format options do not apply: the default exchange and queue "celery".
    router = Router(
        exchange="events", routing_key_template="{aggregate_type}", message_format="celery"
    )
    env = router.route(row(payload=CELERY_PAYLOAD))
    assert (env.exchange, env.routing_key) == ("", "celery")
    env = celery_route(exchange="tasks", routing_key="high")
    assert (env.exchange, env.routing_key) == ("tasks", "high")


def test_celery_args_and_kwargs_default_to_empty() -> None:
    env = celery_route(payload=b"{}")
    assert orjson.loads(env.body)[:2] == [[], {}]
    assert env.headers["argsrepr"] == "()"
    assert env.headers["kwargsrepr"] == "{}"


def test_celery_eta_and_expires_come_from_the_payload() -> None:
    payload = b'{"args": [], "kwargs": {}, "eta": "2026-11-23T10:00:00+00:00", "expires": null}'
    env = celery_route(payload=payload)
    assert env.headers["eta"] == "2026-11-23T10:00:00+00:00"
    assert env.headers["expires"] is None


def test_celery_task_id_is_the_outbox_id_so_redelivery_keeps_it() -> None:
    a = celery_route(id="11111111-2222-4333-8444-555555555555")
    b = celery_route(id="11111111-2222-4333-8444-555555555555")
    assert (
        a.headers["id"] == b.headers["id"] == a.message_id == "11111111-2222-4333-8444-555555555555"
    )
    assert a.body == b.body


@pytest.mark.parametrize(
    "payload",
    [
        b"[1]",
        b'"text"',
        b"null",
        b'{"args": {}}',
        b'{"args": "x"}',
        b'{"kwargs": []}',
        b'{"kwargs": 1}',
        b"nope",
        b"",
    ],
)
def test_celery_payload_must_have_args_and_kwargs(payload: bytes) -> None:
    with pytest.raises(UnmappableRow, match="celery"):
        Router(message_format="celery").route(row(payload=payload))


def test_celery_bad_headers_and_routing_key_are_unmappable() -> None:
    with pytest.raises(UnmappableRow, match="headers"):
        celery_route(headers=b"[1]")
    with pytest.raises(UnmappableRow, match="255"):
        celery_route(routing_key="q" * 256)


# -- properties ---------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def to_json(value: Any) -> bytes:
    """Like Postgres, any-size integers; json (not orjson) so > 64-bit ints serialize."""
    return json.dumps(value, ensure_ascii=False).encode()


def fits(value: str) -> bool:
    return len(value.encode()) <= 255


@settings(max_examples=150, deadline=None)
@given(text, text, text, text, json_values)
def test_any_text_and_payload_round_trip(
    agg: str, event: str, agg_id: str, row_id: str, body: Any
) -> None:
    # The one aggregate type with a meaning of its own: a Celery task (tested on its own).
    assume(agg != TASK_AGGREGATE_TYPE)
    payload = to_json(body)
    r = row(aggregate_type=agg, event_type=event, aggregate_id=agg_id, id=row_id, payload=payload)
    routing_key = f"{agg}.{event}"
    if not (fits(routing_key) and fits(event) and fits(row_id) and row_id):
        with pytest.raises(UnmappableRow):
            Router().route(r)
        return
    env = Router().route(r)
    assert env.body is payload
    assert env.routing_key == routing_key
    assert env.message_id == row_id
    assert env.type == event
    assert env.headers == {
        "tenant": "acme",
        "aggregate_type": agg,
        "aggregate_id": agg_id,
        "event_type": event,
    }
    assert_on_the_wire(env)
    # A custom template renders the same values, verbatim.
    custom = Router(routing_key_template="{aggregate_id}:{aggregate_type}")
    if fits(f"{agg_id}:{agg}"):
        assert custom.route(r).routing_key == f"{agg_id}:{agg}"


@settings(max_examples=100, deadline=None)
@given(text, json_values)
def test_payload_field_templates_render_the_json_value(region: str, other: Any) -> None:
    payload = to_json({"region": region, "other": other})
    router = Router(routing_key_template="r.{payload[region]}")
    if not fits(f"r.{region}"):
        with pytest.raises(UnmappableRow):
            router.route(row(payload=payload))
        return
    env = router.route(row(payload=payload))
    assert env.routing_key == f"r.{region}"
    assert env.body is payload


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(text, json_values, max_size=5))
def test_any_json_object_headers_route_or_are_unmappable_never_unencodable(
    headers: dict[str, Any],
) -> None:
    for router in (Router(), Router(message_format="celery")):
        try:
            env = router.route(row(headers=to_json(headers), payload=CELERY_PAYLOAD))
        except UnmappableRow:
            continue
        assert_on_the_wire(env)
        for key, value in headers.items():
            if key not in ("aggregate_type", "aggregate_id", "event_type"):
                assert env.headers[key] == orjson.loads(to_json(value))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(json_values, max_size=4),
    st.dictionaries(text, json_values, max_size=4),
    text,
)
def test_celery_args_and_kwargs_round_trip(
    args: list[Any], kwargs: dict[str, Any], task: str
) -> None:
    payload = to_json({"args": args, "kwargs": kwargs})
    env = Router(message_format="celery").route(row(payload=payload, event_type=task))
    got_args, got_kwargs, _ = orjson.loads(env.body)
    assert got_args == orjson.loads(to_json(args))
    assert got_kwargs == orjson.loads(to_json(kwargs))
    assert env.headers["task"] == task
    assert env.headers["id"] == env.message_id == ROW_ID
    assert_on_the_wire(env)


def test_timestamps_in_any_offset_are_the_same_instant() -> None:
    base = datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC)
    for minutes in (-720, -90, 0, 330, 840):
        tz = timezone(timedelta(minutes=minutes))
        local = base.astimezone(tz)
        sign = "+" if minutes >= 0 else "-"
        hh, mm = divmod(abs(minutes), 60)
        text_form = local.strftime("%Y-%m-%d %H:%M:%S.%f") + f"{sign}{hh:02d}:{mm:02d}"
        assert parse_timestamptz(text_form) == base


@pytest.mark.parametrize(
    "payload",
    [
        b'{"args": [], "kwargs": {}, "eta": 1e39}',
        b'{"args": [], "kwargs": {}, "expires": 9223372036854775808}',
    ],
)
def test_celery_eta_or_expires_the_wire_cannot_carry_are_unmappable(payload: bytes) -> None:
    with pytest.raises(UnmappableRow, match="header"):
        celery_route(payload=payload)


# -- issue 9: rows that must be dead letters, not crashes ----------------------------------


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


def test_empty_message_id_is_unmappable() -> None:
    """Returns are matched by message id; an empty one could never be matched."""
    with pytest.raises(UnmappableRow, match="empty message id"):
        Router().route(row(id=""))
    with pytest.raises(UnmappableRow, match="empty message id"):
        celery_route(id="")


@pytest.mark.parametrize("depth", [MAX_HEADER_DEPTH, 500, 1000, 5000])
def test_headers_nested_too_deep_are_unmappable_not_recursion_errors(depth: int) -> None:
    headers = b'{"deep": ' + nested(depth) + b"}"
    with pytest.raises(UnmappableRow, match="header"):
        Router().route(row(headers=headers))
    with pytest.raises(UnmappableRow, match="header"):
        celery_route(headers=headers)


def test_headers_just_under_the_depth_bound_are_encodable() -> None:
    headers = b'{"deep": ' + nested(MAX_HEADER_DEPTH - 1) + b"}"
    env = Router().route(row(headers=headers))
    assert_on_the_wire(env)
    nested_dicts = b'{"d": ' + b'{"k": ' * (MAX_HEADER_DEPTH - 1) + b"1" + b"}" * MAX_HEADER_DEPTH
    assert_on_the_wire(Router().route(row(headers=nested_dicts)))


def test_nested_header_names_over_128_bytes_are_refused_not_truncated() -> None:
    ok = b'{"t": {"%s": 1}}' % (b"k" * MAX_NESTED_KEY_BYTES)
    assert_on_the_wire(Router().route(row(headers=ok)))
    too_long = b'{"t": {"%s": 1}}' % (b"k" * (MAX_NESTED_KEY_BYTES + 1))
    with pytest.raises(UnmappableRow, match="nested name longer than 128"):
        Router().route(row(headers=too_long))


@pytest.mark.parametrize(
    "headers",
    [
        b'{"big": "%s"}' % (b"x" * 200_000),
        b'{"many": [%s]}' % b",".join([b"1"] * 20_000),  # 2 bytes of JSON, 9 on the wire each
    ],
)
def test_header_block_larger_than_a_frame_is_unmappable(headers: bytes) -> None:
    with pytest.raises(UnmappableRow, match="one AMQP frame"):
        Router().route(row(headers=headers))
    with pytest.raises(UnmappableRow, match="one AMQP frame"):
        celery_route(headers=headers)


def test_header_block_size_bound_is_an_upper_bound_of_the_wire_size() -> None:
    headers = {"s": "x" * 1000, "n": [1, -(2**40), 3.5, None, True], "t": {"a": {"b": "c"}}}
    env = Router().route(row(headers=orjson.dumps(headers)))
    wire = len(pamqp_encode.field_table(env.headers))
    bound = 4 + sum(1 + len(k) + _header_value_size(k, v, 1) for k, v in env.headers.items())
    assert wire <= bound <= wire + 64


def test_payload_template_on_a_deep_payload_is_unmappable() -> None:
    router = Router(routing_key_template="r.{payload[a]}")
    for depth in (990, 1000, 2000):  # repr recursion limit, orjson's depth limit
        payload = b'{"a": ' + nested(depth) + b"}"
        with pytest.raises(UnmappableRow, match="cannot be rendered"):
            router.route(row(payload=payload))


@pytest.mark.parametrize("depth", [255, 300, 1000])
def test_celery_args_nested_deeper_than_orjson_writes_are_unmappable(depth: int) -> None:
    payload = b'{"args": [' + nested(depth) + b'], "kwargs": {}}'
    with pytest.raises(UnmappableRow, match="celery args"):
        celery_route(payload=payload)


def test_celery_argsrepr_is_truncated_as_celery_does() -> None:
    celery = pytest.importorskip("celery")
    big = "x" * 300_000
    payload = orjson.dumps({"args": [big, [[[[1]]]]], "kwargs": {"k": big}})
    env = celery_route(payload=payload, headers=b"{}")
    app = celery.Celery("t", broker="memory://", set_as_current=False)
    theirs = app.amqp.as_task_v2(ROW_ID, "t", args=(big, [[[[1]]]]), kwargs={"k": big})
    assert env.headers["argsrepr"] == theirs.headers["argsrepr"]
    assert env.headers["kwargsrepr"] == theirs.headers["kwargsrepr"]
    assert len(env.headers["argsrepr"]) < 1100
    assert_on_the_wire(env)


def test_fallback_repr_keeps_celerys_bounds() -> None:
    text = _fallback_repr(("x" * 5000, [[[[[1]]]]]))
    assert len(text) <= CELERY_REPR_MAXSIZE


# -- allowed exchanges and sender-selected distribution ------------------------------------


def test_allowed_exchanges_are_glob_patterns_for_row_exchanges() -> None:
    router = Router(exchange="outbox", allowed_exchanges=["orders.*", "audit", "outbox"])
    assert router.route(row(exchange="orders.eu")).exchange == "orders.eu"
    assert router.route(row(exchange="audit")).exchange == "audit"
    assert router.route(row()).exchange == "outbox"
    for bad in ("amq.topic", "auditx", "", "orders", "Audit"):
        with pytest.raises(UnmappableRow, match="not allowed"):
            router.route(row(exchange=bad))
    with pytest.raises(UnmappableRow, match="not allowed"):
        router.route(
            row(exchange="amq.direct", payload=CELERY_PAYLOAD, aggregate_type="celery.task")
        )


def test_no_allowed_exchanges_means_any_valid_name() -> None:
    assert Router().route(row(exchange="amq.topic")).exchange == "amq.topic"
    assert Router().route(task_row({"args": []}, exchange=None)).exchange == ""


def test_the_policy_checks_the_exchange_actually_used_not_only_a_named_one() -> None:
    """The configured default exchange is checked like a row's own (issue 16)."""
    router = Router(exchange="events", allowed_exchanges=["orders.*"])
    with pytest.raises(UnmappableRow, match="exchange 'events' is not allowed"):
        router.route(row())
    assert router.route(row(exchange="orders.eu")).exchange == "orders.eu"


def test_a_celery_task_to_the_default_exchange_is_checked() -> None:
    """A task row without an exchange goes to "" (any queue by name): refused unless listed.

    It used to pass unchecked, because only an exchange the row names was checked.
    """
    task = task_row({"args": [1], "kwargs": {}}, exchange=None, routing_key="payments")
    for patterns in (["outbox"], ["*"], ["outbox", "amq.*"]):
        router = Router(allowed_exchanges=patterns)
        with pytest.raises(UnmappableRow, match=r"default exchange '' is not allowed.*\(default\)"):
            router.route(task)
        with pytest.raises(UnmappableRow, match="default exchange"):
            Router(message_format="celery", allowed_exchanges=patterns).route(
                row(payload=CELERY_PAYLOAD)
            )
    allowed = Router(allowed_exchanges=["outbox", DEFAULT_EXCHANGE_PATTERN])
    env = allowed.route(task)
    assert (env.exchange, env.routing_key) == ("", "payments")
    # "(default)" admits the default exchange only, not any named one.
    with pytest.raises(UnmappableRow, match="'celery' is not allowed"):
        allowed.route(task_row({"args": []}, exchange="celery"))
    assert exchange_allowed([DEFAULT_EXCHANGE_PATTERN], "")
    assert not exchange_allowed(["*"], "") and exchange_allowed(["*"], "amq.topic")
    assert exchange_allowed([], "")


def test_a_body_over_the_size_limit_is_refused_by_the_router() -> None:
    """The size limit is part of the one policy (resync and replay had none or their own)."""
    payload = b'{"k": "' + b"x" * 100 + b'"}'
    assert Router(max_message_size=len(payload)).route(row(payload=payload)).body == payload
    with pytest.raises(UnmappableRow, match="exceeds the maximum message size 100"):
        Router(max_message_size=100).route(row(payload=payload))
    assert Router().route(row(payload=payload)).body == payload  # None: no limit


@pytest.mark.parametrize("name", ["CC", "BCC"])
def test_cc_and_bcc_headers_are_refused_unless_allowed(name: str) -> None:
    headers = orjson.dumps({name: ["other.key"]})
    with pytest.raises(UnmappableRow, match=name):
        Router().route(row(headers=headers))
    with pytest.raises(UnmappableRow, match=name):
        celery_route(headers=headers)
    env = Router(allow_cc_headers=True).route(row(headers=headers))
    assert env.headers[name] == ["other.key"]


def test_lowercase_cc_is_an_ordinary_header() -> None:
    """RabbitMQ only reads "CC" and "BCC" (case-sensitive)."""
    assert Router().route(row(headers=b'{"cc": "x"}')).headers["cc"] == "x"


# -- check_template ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{aggregate_type}.{event_type}",
        "evt.{aggregate_type}.{aggregate_id}",
        "{id}",
        "static",
        "",
        "r.{payload[region]}",
        "{payload[items][0]}.{event_type}",
        "{{literal}}",
        "{aggregate_id:>5}",
        "{id!r:>255.255}",
        "{aggregate_id:0>9}",
        # Depends on each row's payload: such rows are dead-lettered one by one.
        "{payload.region}",
    ],
)
def test_check_template_accepts_renderable_templates(template: str) -> None:
    Router(routing_key_template=template).check_template()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{", "template"),
        ("{aggregate_type", "template"),
        ("}", "template"),
        ("{nope}", "unknown field {nope}"),
        ("{exchange}.x", "unknown field {exchange}"),
        ("{0}", "unknown field {0}"),
        ("{}", "unknown field {}"),
        ("{aggregate_id:d}", "template"),
        ("{event_type:d}", "cannot be rendered"),
        ("{aggregate_id!z}", "template"),
        # A MemoryError while rendering, before widths were bounded:
        ("{id!r:>99999999999}", "width or precision 99999999999 over 255"),
        ("{aggregate_id:256}", "width or precision 256 over 255"),
        ("{payload[a]:.1000000000}", "width or precision 1000000000"),
        ("{id:>{aggregate_id}}", "a format spec cannot hold a field"),
    ],
)
def test_check_template_refuses_with_one_line(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Router(routing_key_template=template).check_template()
    assert "\n" not in str(info.value)
    # The CLI's --routing-key check is this one, in its own words.
    with pytest.raises(ConfigError) as cli_info:
        check_routing_key(Settings(routing_key=template))
    assert str(cli_info.value) == f"invalid --routing-key {template!r}: {info.value}"


# -- Celery tasks in the default "event" format --------------------------------------------


def task_row(payload: dict[str, Any], **overrides: object) -> OutboxRow:
    values: dict[str, object] = {
        "aggregate_type": TASK_AGGREGATE_TYPE,
        "aggregate_id": ROW_ID,
        "event_type": "app.tasks.add",
        "payload": orjson.dumps(payload),
        "headers": b'{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}',
        "routing_key": "default",
    }
    values.update(overrides)
    return row(**values)


def test_task_rows_become_celery_messages_in_the_event_format() -> None:
    router = Router(exchange="events", routing_key_template="{aggregate_type}")
    payload = {
        "args": [2, 3],
        "kwargs": {},
        "eta": "2026-11-23T10:00:05+00:00",
        "expires": "2026-11-23T11:00:00+00:00",
        "priority": 7,
        "root_id": "root-1",
        "parent_id": "parent-1",
    }
    env = router.route(task_row(payload))
    assert (env.exchange, env.routing_key) == ("", "default")
    assert orjson.loads(env.body) == [
        [2, 3],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    assert env.message_id == env.correlation_id == env.headers["id"] == ROW_ID
    assert env.priority == 7
    h = env.headers
    assert (h["task"], h["eta"], h["expires"]) == (
        "app.tasks.add",
        "2026-11-23T10:00:05+00:00",
        "2026-11-23T11:00:00+00:00",
    )
    assert (h["root_id"], h["parent_id"], h["retries"]) == ("root-1", "parent-1", 0)
    assert h["traceparent"].startswith("00-0af7")
    assert h["argsrepr"] == "(2, 3)"
    assert env.content_encoding == "utf-8" and env.type is None
    assert_on_the_wire(env)
    # An ordinary event row next to it keeps the event mapping.
    assert router.route(row()).exchange == "events"


def test_task_row_defaults_root_id_to_the_task_id_and_queue_to_celery() -> None:
    env = Router().route(task_row({"args": [], "kwargs": {}}, routing_key=None))
    assert env.routing_key == "celery"
    assert env.headers["root_id"] == ROW_ID and env.headers["parent_id"] is None
    assert env.priority is None


@pytest.mark.parametrize(
    "payload",
    [
        {"priority": 256},
        {"priority": -1},
        {"priority": "high"},
        {"priority": 1.5},
        {"root_id": 5},
        {"parent_id": ["x"]},
        {"eta": "tomorrow"},
        {"eta": 1700000000},
        {"expires": "2026-13-01T00:00:00"},
        {"expires": {"at": "2026-11-23T10:00:00"}},
    ],
)
def test_task_row_bad_fields_are_unmappable(payload: dict[str, Any]) -> None:
    with pytest.raises(UnmappableRow, match="celery"):
        Router().route(task_row({"args": [], "kwargs": {}, **payload}))


def test_priority_is_encoded_as_pamqp_does() -> None:
    from pamqp import commands as spec
    from pamqp.header import ContentHeader

    from cdc_relay.amqp_wire import encode_properties

    env = Router().route(task_row({"args": [], "kwargs": {}, "priority": 9}))
    flags, properties = encode_properties(env)
    theirs = ContentHeader(
        0,
        0,
        spec.Basic.Properties(
            content_type=env.content_type,
            content_encoding=env.content_encoding,
            headers=env.headers,
            delivery_mode=env.delivery_mode,
            priority=env.priority,
            correlation_id=env.correlation_id,
            message_id=env.message_id,
            timestamp=env.timestamp,
            app_id=env.app_id,
        ),
    ).marshal()
    # class, weight, body size, then the same flags and (sorted-key) property list length.
    assert int.from_bytes(theirs[12:14], "big") == flags
    assert len(theirs) - 14 == len(properties)

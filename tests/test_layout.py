"""Column mapping (layout.py), per-row AMQP properties and trace context (properties.py):
parsing, reading rows through a mapping, and every refusal as one line."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader

from cdc_relay.amqp_wire import PublishEncoder
from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.layout import DEFAULT_LAYOUT, build_layout
from cdc_relay.properties import take_properties, trace_headers
from cdc_relay.router import Router, amqp_users
from cdc_relay.rows import (
    BYTEA_OID,
    INT4_OID,
    JSONB_OID,
    OutboxRow,
    OutboxSchemaError,
    RowReader,
    UnmappableRow,
)

DEBEZIUM = build_layout("debezium")
DEBEZIUM_TABLE = ("id", "aggregatetype", "aggregateid", "type", "payload", "timestamp")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# -- parsing ----------------------------------------------------------------------------


def test_default_layout_is_ours() -> None:
    assert build_layout() == DEFAULT_LAYOUT
    assert build_layout().is_default
    assert not DEBEZIUM.is_default


def test_debezium_preset() -> None:
    assert DEBEZIUM.column_of("aggregate_type") == "aggregatetype"
    assert DEBEZIUM.column_of("event_type") == "type"
    assert DEBEZIUM.column_of("created_at") == "timestamp"
    assert DEBEZIUM.column_of("trace_context") == "tracingspancontext"
    assert DEBEZIUM.column_of("headers") is None
    # timestamp and tracingspancontext are optional: only the five required columns must exist
    assert [c for c, _ in DEBEZIUM.expected_columns()] == [
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
    ]


def test_column_and_header_specs() -> None:
    layout = build_layout(
        "debezium",
        ["correlation_id=aggregateid", " event_type = kind "],
        ["tenant_id:x-tenant", "region"],
    )
    assert layout.column_of("correlation_id") == "aggregateid"
    assert layout.column_of("event_type") == "kind"
    assert layout.header_columns == (("tenant_id", "x-tenant"), ("region", "region"))
    assert ("tenant_id", "header x-tenant") in layout.expected_columns()


@pytest.mark.parametrize(
    ("name", "columns", "headers", "needle"),
    [
        ("kafka", [], [], "unknown layout 'kafka'"),
        ("cdc-relay", ["aggregate_type"], [], "use FIELD=COLUMN"),
        ("cdc-relay", ["=kind"], [], "use FIELD=COLUMN"),
        ("cdc-relay", ["kind="], [], "use FIELD=COLUMN"),
        ("cdc-relay", ["colour=c"], [], "unknown field 'colour'"),
        ("cdc-relay", ["id=a", "id=b"], [], "id is mapped twice"),
        ("cdc-relay", ["id=" + "c" * 64], [], "at most 63 bytes"),
        ("cdc-relay", [], [":x"], "use COLUMN or COLUMN:HEADER"),
        ("cdc-relay", [], ["tenant:"], "use COLUMN or COLUMN:HEADER"),
        ("cdc-relay", [], ["tenant:" + "h" * 256], "over 255 bytes"),
        ("cdc-relay", [], ["kind:event_type"], "sets header event_type itself"),
        ("cdc-relay", [], ["a:x", "b:x"], "header 'x' is filled by two columns"),
    ],
)
def test_bad_specs_are_one_line(
    name: str, columns: list[str], headers: list[str], needle: str
) -> None:
    with pytest.raises(ValueError) as info:
        build_layout(name, columns, headers)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_settings_check_refuses_a_bad_mapping() -> None:
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        Settings(column=["colour=c"]).check()
    with pytest.raises(ConfigError, match="layout"):
        Settings(layout="kafka").check()
    Settings(layout="debezium", column=["priority=prio"], header_column=["t:x-t"]).check()


# -- the table check --------------------------------------------------------------------

DEBEZIUM_TYPES = {
    "id": "uuid",
    "aggregatetype": "varchar",
    "aggregateid": "varchar",
    "type": "varchar",
    "payload": "jsonb",
    "timestamp": "timestamptz",
    "tracingspancontext": "varchar",
}


def test_check_table_accepts_debezium_and_its_payload_types() -> None:
    DEBEZIUM.check_table("t", DEBEZIUM_TYPES, [])
    for kind in ("json", "text", "bytea", "varchar"):
        DEBEZIUM.check_table("t", {**DEBEZIUM_TYPES, "payload": kind}, [])
    without_optional = {k: v for k, v in DEBEZIUM_TYPES.items() if k not in ("timestamp",)}
    DEBEZIUM.check_table("t", without_optional, [])


@pytest.mark.parametrize(
    ("layout", "types", "needle"),
    [
        (DEBEZIUM, {"aggregatetype": None}, "lacks column aggregatetype for aggregate_type"),
        (DEBEZIUM, {"payload": "int4"}, "column payload of outbox table t is int4; payload needs"),
        (DEBEZIUM, {"timestamp": "int8"}, "column timestamp of outbox table t is int8; created_at"),
        (DEBEZIUM, {"type": "jsonb"}, "column type of outbox table t is jsonb; event_type"),
        (
            build_layout("debezium", [], ["tenant:x-tenant"]),
            {},
            "lacks column tenant for header x-tenant",
        ),
        (
            build_layout("debezium", ["priority=prio"]),
            {},
            "lacks column prio for priority (--column priority=COLUMN)",
        ),
        (
            build_layout("debezium", ["priority=prio"]),
            {"prio": "float8"},
            "column prio of outbox table t is float8; priority needs",
        ),
    ],
)
def test_check_table_refusals_name_the_column(
    layout: Any, types: dict[str, str | None], needle: str
) -> None:
    table = {**DEBEZIUM_TYPES, **types}
    present = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ValueError) as info:
        layout.check_table("t", present, [])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_check_table_refuses_a_generated_mapped_column() -> None:
    with pytest.raises(ValueError, match=r"generated column\(s\) type"):
        DEBEZIUM.check_table("t", DEBEZIUM_TYPES, ["type"])
    DEBEZIUM.check_table("t", {**DEBEZIUM_TYPES, "note": "text"}, ["note"])


# -- reading rows ---------------------------------------------------------------------


def test_debezium_row_is_read_by_its_columns() -> None:
    names = ("payload", "type", "aggregateid", "aggregatetype", "id", "timestamp", "extra")
    values = (b'{"a": 1}', b"Created", b"42", b"order", b"u-1", b"2024-01-02 03:04:05+00", b"x")
    row = RowReader(names, DEBEZIUM).read(values)
    assert (row.id, row.aggregate_type, row.aggregate_id, row.event_type) == (
        "u-1",
        "order",
        "42",
        "Created",
    )
    assert row.payload == b'{"a": 1}'
    assert row.created_at == "2024-01-02 03:04:05+00"
    assert row.headers is None and row.exchange is None and row.routing_key is None
    env = Router(layout=DEBEZIUM).route(row)
    assert env.routing_key == "order.Created"
    assert env.message_id == "u-1" and env.type == "Created"
    assert env.body == b'{"a": 1}'
    assert env.timestamp is not None and env.timestamp.year == 2024


def test_a_missing_required_column_names_the_mapped_column() -> None:
    with pytest.raises(OutboxSchemaError, match="aggregatetype"):
        RowReader(("id", "aggregate_type", "aggregateid", "type", "payload"), DEBEZIUM)


def test_extras_header_columns_typed_properties_and_bytea() -> None:
    layout = build_layout(
        "debezium",
        ["correlation_id=corr", "priority=prio"],
        ["tenant:x-tenant", "n", "flag", "meta"],
    )
    names = (*DEBEZIUM_TABLE, "tracingspancontext", "corr", "prio", "tenant", "n", "flag", "meta")
    oids = [2950, 1043, 1043, 1043, BYTEA_OID, 1184, 1043, 25, INT4_OID, 25, INT4_OID, 16]
    oids.append(JSONB_OID)
    values = (
        b"u-1",
        b"order",
        b"1",
        b"Created",
        b"\\x00ff10",
        None,
        TRACEPARENT.encode(),
        b"c-9",
        b"7",
        b"acme",
        b"12",
        b"t",
        b'{"k": [1, "v"]}',
    )
    row = RowReader(names, layout, oids).read(values)
    assert row.payload == b"\x00\xff\x10"
    assert row.column_headers == {
        "x-tenant": "acme",
        "n": 12,
        "flag": True,
        "meta": {"k": [1, "v"]},
    }
    assert row.properties == {"correlation_id": "c-9", "priority": "7"}
    env = Router(layout=layout).route(row)
    assert env.headers["x-tenant"] == "acme" and env.headers["n"] == 12
    assert env.headers["traceparent"] == TRACEPARENT
    assert env.correlation_id == "c-9" and env.priority == 7
    assert env.body == b"\x00\xff\x10"
    # A NULL header column leaves its header out.
    row = RowReader(names, layout, oids).read((*values[:9], None, *values[10:]))
    assert row.column_headers is not None and "x-tenant" not in row.column_headers


def test_the_default_layout_reads_no_extras() -> None:
    names = ("id", "aggregate_type", "aggregate_id", "event_type", "payload", "tracingspancontext")
    row = RowReader(names).read((b"i", b"t", b"a", b"e", b"{}", TRACEPARENT.encode()))
    assert row.trace_context is None and row.column_headers is None and row.properties is None
    assert set(row.as_dict()) == {
        "id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        "headers",
        "exchange",
        "routing_key",
        "created_at",
    }


# -- headers from columns ---------------------------------------------------------------


def row(**fields: Any) -> OutboxRow:
    base: dict[str, Any] = {
        "id": "u-1",
        "aggregate_type": "order",
        "aggregate_id": "1",
        "event_type": "Created",
        "payload": b"{}",
    }
    return OutboxRow(**{**base, **fields})


def test_header_columns_follow_the_header_rules() -> None:
    with pytest.raises(UnmappableRow, match="more than"):
        Router().route(row(column_headers={"big": "x" * 140_000}))
    with pytest.raises(UnmappableRow, match="int64"):
        Router().route(row(column_headers={"n": 2**64}))
    with pytest.raises(UnmappableRow, match="CC"):
        Router().route(row(column_headers={"CC": "q"}))
    # A header column wins over the headers column's value of the same name.
    env = Router().route(
        row(headers=b'{"x-tenant": "old", "keep": 1}', column_headers={"x-tenant": "new"})
    )
    assert env.headers["x-tenant"] == "new" and env.headers["keep"] == 1


def test_trace_context_forms() -> None:
    java = (
        "#Tue Aug 10 12:00:00 UTC 2024\n"
        f"traceparent={TRACEPARENT}\ntracestate=rojo=00f067aa0ba902b7\n"
    )
    assert trace_headers(java) == {
        "traceparent": TRACEPARENT,
        "tracestate": "rojo=00f067aa0ba902b7",
    }
    assert trace_headers(TRACEPARENT) == {"traceparent": TRACEPARENT}
    assert trace_headers(f"traceparent={TRACEPARENT}\ntracestate=") == {"traceparent": TRACEPARENT}
    assert trace_headers("  ") == {}
    for bad in ("uber-trace-id=abc:def:0:1", "traceparent=00-xyz", "nonsense"):
        with pytest.raises(UnmappableRow, match="no valid W3C traceparent"):
            trace_headers(bad)
    with pytest.raises(UnmappableRow, match="tracestate longer"):
        trace_headers(f"traceparent={TRACEPARENT}\ntracestate={'a' * 600}")
    env = Router().route(row(trace_context=java))
    assert env.headers["traceparent"] == TRACEPARENT
    with pytest.raises(UnmappableRow, match="traceparent"):
        Router().route(row(trace_context="garbage"))


# -- AMQP properties ----------------------------------------------------------------------


def test_properties_from_reserved_headers() -> None:
    headers = (
        b'{"correlation_id": "c1", "reply_to": "amq.rabbitmq.reply-to", "expiration": "60000",'
        b' "priority": 9, "content_type": "text/plain", "content_encoding": "gzip",'
        b' "type": "order.v2", "app_id": "shop", "user_id": "guest", "x-other": "kept"}'
    )
    env = Router(amqp_users={"guest"}).route(row(headers=headers))
    assert env.correlation_id == "c1"
    assert env.reply_to == "amq.rabbitmq.reply-to"
    assert env.expiration == "60000"
    assert env.priority == 9
    assert env.content_type == "text/plain"
    assert env.content_encoding == "gzip"
    assert env.type == "order.v2"
    assert env.app_id == "shop"
    assert env.user_id == "guest"
    # Reserved names leave the header table; the rest stays.
    assert set(env.headers) == {"x-other", "aggregate_type", "aggregate_id", "event_type"}


def test_a_mapped_column_wins_over_the_header() -> None:
    env = Router().route(
        row(headers=b'{"correlation_id": "h", "expiration": 5}', properties={"correlation_id": "c"})
    )
    assert env.correlation_id == "c" and env.expiration == "5"


@pytest.mark.parametrize(
    ("properties", "needle"),
    [
        ({"priority": 256}, "priority must be 0-255, got 256"),
        ({"priority": -1}, "priority must be 0-255, got -1"),
        ({"priority": "high"}, "priority must be a non-negative integer"),
        ({"priority": 1.5}, "priority must be a non-negative integer"),
        ({"priority": True}, "priority must be a non-negative integer"),
        ({"expiration": "-1"}, "expiration must be a non-negative integer"),
        ({"expiration": "1.5"}, "expiration must be a non-negative integer"),
        ({"expiration": "soon"}, "expiration must be a non-negative integer"),
        ({"expiration": 2**32}, "expiration must be 0-4294967295"),
        ({"correlation_id": "c" * 256}, "correlation_id longer than 255 bytes"),
        ({"reply_to": 5}, "reply_to must be a string, got int"),
        ({"content_type": ["a"]}, "content_type must be a string"),
        ({"app_id": "é" * 128}, "app_id longer than 255 bytes"),
        ({"user_id": "mallory"}, "user_id 'mallory' is not the connection's user"),
    ],
)
def test_invalid_properties_are_refused(properties: dict[str, Any], needle: str) -> None:
    with pytest.raises(UnmappableRow) as info:
        take_properties(dict(properties), None, {"guest"})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_user_id_checks() -> None:
    assert take_properties({"user_id": "guest"}, None, {"guest"}) == {"user_id": "guest"}
    with pytest.raises(UnmappableRow, match="not known"):
        take_properties({"user_id": "guest"}, None, frozenset())
    # The app side (users None) cannot know the relay's user: not checked there.
    assert take_properties({"user_id": "x"}, None, None) == {"user_id": "x"}
    assert amqp_users(["amqp://relay:pw@h/"]) == {"relay"}
    assert amqp_users(["amqp://h/"]) == {"guest"}
    assert amqp_users(["amqp://a%40b:pw@h/", "amqp://a%40b:pw@h2/"]) == {"a@b"}
    assert amqp_users(["amqp://a:pw@h/", "amqp://b:pw@h2/"]) == frozenset()
    assert amqp_users(["amqps://h/?certfile=c&auth_mechanism=external"]) == frozenset()
    router = Router.from_settings(Settings(amqp_urls=["amqp://relay:pw@h/"]))
    with pytest.raises(UnmappableRow, match="connects as 'relay'"):
        router.route(row(headers=b'{"user_id": "guest"}'))


def test_null_properties_are_left_out() -> None:
    env = Router().route(row(headers=b'{"correlation_id": null, "priority": null}'))
    assert env.correlation_id is None and env.priority is None
    assert "priority" not in env.headers


def test_every_property_on_the_wire_matches_pamqp() -> None:
    env = Router(amqp_users={"guest"}).route(
        row(
            headers=b'{"correlation_id": "c1", "reply_to": "r", "expiration": "100",'
            b' "priority": 3, "content_encoding": "gzip", "user_id": "guest", "app_id": "a"}'
        )
    )
    data = PublishEncoder(1, 131072).encode(env)
    _, _, method = pamqp_frame.unmarshal(data)
    assert isinstance(method, spec.Basic.Publish)
    consumed, _, _ = pamqp_frame.unmarshal(data)
    _, _, header = pamqp_frame.unmarshal(data[consumed:])
    assert isinstance(header, ContentHeader)
    props = header.properties
    assert (props.correlation_id, props.reply_to, props.expiration) == ("c1", "r", "100")
    assert (props.priority, props.content_encoding, props.user_id) == (3, "gzip", "guest")
    assert (props.app_id, props.message_id, props.message_type) == ("a", "u-1", "Created")


def test_rows_without_reserved_headers_keep_them_all() -> None:
    env = Router().route(row(headers=b'{"tenant": "acme", "priority_class": "high"}'))
    assert env.headers["priority_class"] == "high" and env.priority is None
    assert env.correlation_id is None and env.app_id == "cdc-relay"

"""CloudEvents mapping (--format cloudevents, cloudevents-structured): pure unit tests.

Every message is also read back with the CloudEvents Python SDK's RabbitMQ
binding (``cloudevents.core.bindings.rabbitmq``), which validates the event.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.v1.event import CloudEvent

from cdc_relay.cloudevents import (
    STRUCTURED_CONTENT_TYPE,
    CloudEvents,
    check_source,
    default_source,
    rfc3339,
)
from cdc_relay.config import Settings, dsn_database
from cdc_relay.envelope import Envelope
from cdc_relay.errors import ConfigError
from cdc_relay.router import Router
from cdc_relay.rows import OutboxRow, UnmappableRow

ROW_ID = "0b9c6f3e-0000-4000-8000-000000000001"
SOURCE = "/cdc-relay/app/public.outbox"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def row(**overrides: Any) -> OutboxRow:
    values: dict[str, Any] = {
        "id": ROW_ID,
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderPaid",
        "payload": b'{"total": 12.5, "items": ["a", "\xc3\xbc"]}',
        "headers": b'{"tenant": "acme"}',
        "exchange": None,
        "routing_key": None,
        "created_at": "2026-11-23 10:11:12.123456+00",
    }
    values.update(overrides)
    return OutboxRow(**values)


def binary(**overrides: Any) -> Envelope:
    return Router(message_format="cloudevents", ce_source=SOURCE).route(row(**overrides))


def structured(**overrides: Any) -> Envelope:
    router = Router(message_format="cloudevents-structured", ce_source=SOURCE)
    return router.route(row(**overrides))


def sdk_event(envelope: Envelope) -> CloudEvent:
    """The event as the SDK reads the message (it picks the mode from content_type)."""
    strings = {k: v for k, v in envelope.headers.items() if isinstance(v, str)}
    message = rabbitmq.RabbitMQMessage(
        headers=strings, content_type=envelope.content_type, body=envelope.body
    )
    return rabbitmq.from_rabbitmq_event(message)


# -- binary content mode ----------------------------------------------------------------


def test_binary_every_attribute_as_a_ce_header() -> None:
    env = binary(headers=orjson.dumps({"tenant": "acme", "traceparent": TRACEPARENT}))
    ce = {k: v for k, v in env.headers.items() if k.startswith("ce-")}
    assert ce == {
        "ce-specversion": "1.0",
        "ce-id": ROW_ID,
        "ce-source": SOURCE,
        "ce-type": "OrderPaid",
        "ce-subject": "42",
        "ce-time": "2026-11-23T10:11:12.123456Z",
        "ce-tenant": "acme",
        "ce-traceparent": TRACEPARENT,
    }
    # The event format's message, unchanged: body, properties, plain headers.
    assert env.body == b'{"total": 12.5, "items": ["a", "\xc3\xbc"]}'
    assert env.content_type == "application/json"  # datacontenttype
    assert (env.message_id, env.type, env.exchange, env.routing_key) == (
        ROW_ID,
        "OrderPaid",
        "outbox",
        "order.OrderPaid",
    )
    assert env.timestamp == datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC)
    assert {k: v for k, v in env.headers.items() if not k.startswith("ce-")} == {
        "tenant": "acme",
        "traceparent": TRACEPARENT,
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderPaid",
    }


def test_binary_is_read_by_the_sdk() -> None:
    env = binary(headers=orjson.dumps({"traceparent": TRACEPARENT, "tracestate": "k=v"}))
    event = sdk_event(env)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == ROW_ID
    assert event.get_source() == SOURCE
    assert event.get_type() == "OrderPaid"
    assert event.get_subject() == "42"
    assert event.get_time() == datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC)
    assert event.get_datacontenttype() == "application/json"
    assert event.get_extension("traceparent") == TRACEPARENT
    assert event.get_extension("tracestate") == "k=v"
    assert event.get_data() == {"total": 12.5, "items": ["a", "ü"]}


def test_missing_optional_values_leave_their_attributes_out() -> None:
    env = binary(aggregate_id="", created_at=None, headers=None)
    ce = sorted(k for k in env.headers if k.startswith("ce-"))
    assert ce == ["ce-id", "ce-source", "ce-specversion", "ce-type"]
    assert sdk_event(env).get_subject() is None  # (the SDK fills a missing time with now)
    doc = orjson.loads(structured(aggregate_id="", created_at="infinity", headers=None).body)
    assert "subject" not in doc and "time" not in doc and "traceparent" not in doc


def test_extension_values_are_canonical_strings_in_binary_and_json_in_structured() -> None:
    headers = {"flag": True, "off": False, "n": -(2**31), "big": 2**31 - 1, "s": "x"}
    env = binary(headers=orjson.dumps(headers))
    assert {k: env.headers["ce-" + k] for k in headers} == {
        "flag": "true",
        "off": "false",
        "n": "-2147483648",
        "big": "2147483647",
        "s": "x",
    }
    assert env.headers["flag"] is True  # the plain header keeps its type
    doc = orjson.loads(structured(headers=orjson.dumps(headers)).body)
    assert {k: doc[k] for k in headers} == headers


@pytest.mark.parametrize(
    "headers",
    [
        {"Tenant": "upper case"},
        {"x-tenant": "dash"},
        {"tenant_id": "underscore"},
        {"a" * 21: "longer than 20"},
        {"": "empty name"},
        {"subject": "a spec attribute"},
        {"time": "a spec attribute"},
        {"data": "reserved"},
        {"dataschema": "a spec attribute"},
        {"ratio": 1.5},
        {"none": None},
        {"nested": {"a": 1}},
        {"items": [1, 2]},
        {"wide": 2**31},
        {"low": -(2**31) - 1},
        {"ctl": "line\nbreak"},
    ],
)
def test_a_header_that_cannot_be_an_extension_stays_a_plain_header(
    headers: dict[str, Any],
) -> None:
    env = binary(headers=orjson.dumps(headers))
    ((name, value),) = headers.items()
    assert env.headers[name] == value
    assert f"ce-{name}" not in env.headers or name in ("subject", "type", "time")
    if name in ("subject", "type", "time"):  # the relay's own attribute, not the header
        assert env.headers[f"ce-{name}"] != value
    doc = orjson.loads(structured(headers=orjson.dumps(headers)).body)
    assert (name, value) not in doc.items()
    assert sdk_event(env).get_id() == ROW_ID  # still a valid event


@pytest.mark.parametrize("name", ["ce-id", "CE-Source", "ce-tenant", "Ce-"])
def test_a_row_header_with_the_ce_prefix_is_refused_in_both_modes(name: str) -> None:
    for route in (binary, structured):
        with pytest.raises(UnmappableRow, match="CloudEvents attributes the relay writes"):
            route(headers=orjson.dumps({name: "forged"}))


def test_values_a_cloudevent_cannot_carry_are_refused() -> None:
    for route in (binary, structured):
        with pytest.raises(UnmappableRow, match="needs a type"):
            route(event_type="")
        with pytest.raises(UnmappableRow, match=r"event_type .* control characters"):
            route(event_type="Paid\x00")
        with pytest.raises(UnmappableRow, match=r"aggregate_id .* control characters"):
            route(aggregate_id="4\n2")


def test_the_event_format_and_celery_tasks_are_unchanged() -> None:
    plain = Router(ce_source=SOURCE).route(row())
    assert not any(k.startswith("ce-") for k in plain.headers)
    task = Router(message_format="cloudevents").route(
        row(aggregate_type="celery.task", payload=b'{"args": [1]}')
    )
    assert task.content_type == "application/json" and "task" in task.headers
    assert not any(k.startswith("ce-") for k in task.headers)


# -- structured content mode ------------------------------------------------------------


def test_structured_is_one_json_object_with_the_payload_embedded_as_is() -> None:
    payload = b'{"total": 12.5,   "n": 123456789012345678901234567890, "x": 1e400}'
    env = structured(payload=payload, headers=orjson.dumps({"traceparent": TRACEPARENT}))
    assert env.content_type == STRUCTURED_CONTENT_TYPE
    assert (env.message_id, env.type) == (ROW_ID, "OrderPaid")
    assert env.body.endswith(b',"data":' + payload + b"}")  # not re-encoded
    head = orjson.loads(env.body[: -len(b',"data":' + payload + b"}")] + b"}")
    assert head == {
        "specversion": "1.0",
        "id": ROW_ID,
        "source": SOURCE,
        "type": "OrderPaid",
        "subject": "42",
        "time": "2026-11-23T10:11:12.123456Z",
        "traceparent": TRACEPARENT,
        "datacontenttype": "application/json",
    }
    # No ce- headers in structured mode; the plain headers stay.
    assert env.headers == {
        "traceparent": TRACEPARENT,
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderPaid",
    }


def test_structured_is_read_by_the_sdk() -> None:
    event = sdk_event(structured())
    assert (event.get_id(), event.get_source(), event.get_type()) == (ROW_ID, SOURCE, "OrderPaid")
    assert event.get_subject() == "42"
    assert event.get_time() == datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC)
    assert event.get_datacontenttype() == "application/json"
    assert event.get_data() == {"total": 12.5, "items": ["a", "ü"]}


@pytest.mark.parametrize("payload", [b'"a string"', b"3", b"null", b"[1, {}]", b" {} "])
def test_structured_embeds_any_json_value(payload: bytes) -> None:
    assert orjson.loads(structured(payload=payload).body)["data"] == orjson.loads(payload)


@pytest.mark.parametrize("payload", [b"", b"{", b'{"a": 1} x', b"not json", b"\xff"])
def test_structured_refuses_a_payload_that_is_not_json(payload: bytes) -> None:
    with pytest.raises(UnmappableRow, match="payload is not valid JSON"):
        structured(payload=payload)
    assert binary(payload=payload).body == payload  # binary mode carries any bytes


def test_structured_carries_non_json_content_as_a_json_string() -> None:
    event = Envelope("outbox", "k", b"<a/>", ROW_ID, "T", {}, content_type="application/xml")
    env = CloudEvents(SOURCE, structured=True)(row(payload=b"<a/>"), event)
    doc = orjson.loads(env.body)
    assert (doc["datacontenttype"], doc["data"]) == ("application/xml", "<a/>")


def test_the_size_limit_applies_to_the_structured_body() -> None:
    router = Router(message_format="cloudevents-structured", max_message_size=100)
    with pytest.raises(UnmappableRow, match="maximum message size"):
        router.route(row(payload=b'{"pad": "' + b"x" * 60 + b'"}'))


# -- time -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23 10:11:12.123456+00", "2026-11-23T10:11:12.123456Z"),
        ("2026-11-23 10:11:12.12+00", "2026-11-23T10:11:12.12Z"),
        ("2026-11-23 10:11:12.000100+00", "2026-11-23T10:11:12.0001Z"),
        ("2026-11-23 10:11:12+00", "2026-11-23T10:11:12Z"),
        ("2026-11-23 00:30:00+01", "2026-11-22T23:30:00Z"),
        ("2026-11-23 10:11:12.5+05:30", "2026-11-23T04:41:12.5Z"),
        ("1900-01-01 00:00:00+00:17:30", "1899-12-31T23:42:30Z"),
        ("2026-11-23 10:11:12", "2026-11-23T10:11:12Z"),  # a timestamp column: UTC
        ("1950-06-01 12:00:00+00", "1950-06-01T12:00:00Z"),  # before 1970: fine here
        ("0044-03-15 12:00:00+00", "0044-03-15T12:00:00Z"),
        ("9999-12-31 23:59:59.999999+00", "9999-12-31T23:59:59.999999Z"),
        ("0044-03-15 12:00:00+00 BC", None),
        ("2026-02-30 10:00:00+00", None),  # the shape of a timestamptz, not a date
        ("2026-02-30 10:00:00+01", None),
        ("0001-01-01 00:00:00+05", None),  # in UTC, before year 1
        ("12026-01-01 00:00:00+00", None),
        ("infinity", None),
        ("-infinity", None),
        ("", None),
        (None, None),
    ],
)
def test_rfc3339_from_postgres_text(text: str | None, expected: str | None) -> None:
    assert rfc3339(text) == expected
    if expected is not None:
        env = binary(created_at=text)
        assert env.headers["ce-time"] == expected
        assert sdk_event(env).get_time() == datetime.fromisoformat(expected)


def test_one_router_gives_each_row_its_own_time() -> None:
    router = Router(message_format="cloudevents", ce_source=SOURCE)
    times = [
        router.route(row(created_at=text)).headers.get("ce-time")
        for text in (
            "2026-01-01 00:00:00+00",
            "2026-01-01 00:00:00+00",
            None,
            "2026-01-02 00:00:00+00",
        )
    ]
    assert times == ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", None, "2026-01-02T00:00:00Z"]
    # (the last one is not what Postgres prints, so it takes the slow path)


def test_headers_too_large_once_copied_as_extensions_are_refused() -> None:
    big = orjson.dumps({"blob": "x" * 70_000})
    assert len(Router().route(row(headers=big)).headers["blob"]) == 70_000  # event format
    with pytest.raises(UnmappableRow, match=r"more than .* that fit one AMQP frame"):
        binary(headers=big)
    assert orjson.loads(structured(headers=big).body)["blob"] == "x" * 70_000
    with pytest.raises(UnmappableRow, match="fit one AMQP frame"):
        binary(aggregate_id="4" * 70_000, headers=orjson.dumps({"pad": "y" * 60_000}))


# -- source -----------------------------------------------------------------------------


def test_default_source_names_database_and_table() -> None:
    assert default_source("app", "public", "outbox") == "/cdc-relay/app/public.outbox"
    assert default_source("my db", "bill/ing", "out.box") == "/cdc-relay/my%20db/bill%2Fing.out.box"
    settings = Settings(dsn="postgresql://relay@db.internal:5432/shop", table="sales.outbox")
    assert settings.cloudevents_source == "/cdc-relay/shop/sales.outbox"
    given = dataclasses.replace(settings, ce_source="urn:shop:orders")
    assert given.cloudevents_source == "urn:shop:orders"
    env = Router.from_settings(dataclasses.replace(settings, message_format="cloudevents")).route(
        row()
    )
    assert env.headers["ce-source"] == "/cdc-relay/shop/sales.outbox"


def test_the_database_is_the_one_libpq_would_pick(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGDATABASE", "PGUSER"):
        monkeypatch.delenv(name, raising=False)
    assert dsn_database("host=h dbname=orders user=u") == "orders"
    assert dsn_database("postgresql://u@h/") == "u"  # no database: the user's name
    monkeypatch.setenv("PGDATABASE", "fromenv")
    assert dsn_database("postgresql://u@h/") == "fromenv"
    assert dsn_database("postgresql://u@h/named") == "named"


@pytest.mark.parametrize("source", ["", " ", "/a b", "/a\nb", "x\x7f"])
def test_an_invalid_source_is_one_config_line(source: str) -> None:
    with pytest.raises(ValueError, match="invalid CloudEvents source"):
        check_source(source)
    with pytest.raises(ConfigError, match="--ce-source: invalid CloudEvents source"):
        Settings(ce_source=source).check()


def test_cloudevents_formats_keep_the_exchange_rules() -> None:
    # The default exchange is --exchange, as in event format (Celery's is "").
    Settings(message_format="cloudevents", exchange="ev", allowed_exchanges=["ev"]).check()
    with pytest.raises(ConfigError, match="--exchange 'ev' is not allowed"):
        Settings(message_format="cloudevents", exchange="ev", allowed_exchanges=["x"]).check()


@pytest.mark.parametrize("command", ["run", "resync", "dead-letters replay"])
def test_a_bad_ce_source_on_the_command_line_is_one_line_and_exit_78(command: str) -> None:
    from click.testing import CliRunner

    from cdc_relay import cli

    args = [*command.split(), "--ce-source", "a b", "--dsn", "host=127.0.0.1 port=1"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 78, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "cdc-relay: error: --ce-source: invalid CloudEvents source 'a b': a non-empty "
        "URI-reference without spaces or control characters (e.g. /cdc-relay/app/public.outbox)"
    ]


def test_a_type_header_is_the_amqp_type_property_and_ce_type_stays_the_event_type() -> None:
    """``type`` is a reserved header name (a per-row AMQP property), not a plain header."""
    env = binary(headers=orjson.dumps({"type": "from the header"}))
    assert "type" not in env.headers
    assert env.type == "from the header"
    assert env.headers["ce-type"] != "from the header"

"""Router: outbox row -> envelope, exactly the mapping of DESIGN.md §4."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_relay.router import (
    OutboxRow,
    OutboxSchemaError,
    Router,
    RowReader,
    UnmappableRow,
    parse_timestamptz,
)

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


def row(**overrides: object) -> OutboxRow:
    values: dict[str, object] = {
        "id": "0b9c6f3e-0000-4000-8000-000000000001",
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


def test_default_event_mapping() -> None:
    env = Router().route(row())
    assert env.exchange == "outbox"
    assert env.routing_key == "order.OrderCreated"
    assert env.body == b'{"total": 12.5}'
    assert env.message_id == "0b9c6f3e-0000-4000-8000-000000000001"
    assert env.type == "OrderCreated"
    assert env.content_type == "application/json"
    assert env.delivery_mode == 2
    assert env.app_id == "cdc-relay"
    assert env.timestamp == datetime(2026, 11, 23, 10, 11, 12, 123456, tzinfo=UTC)
    assert env.headers == {
        "tenant": "acme",
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderCreated",
    }


def test_body_is_the_payload_object_itself() -> None:
    payload = b'{"a": [1, 2, {"b": "\xc3\xbc"}]}'
    assert Router().route(row(payload=payload)).body is payload


def test_per_row_overrides() -> None:
    env = Router(exchange="events").route(row(exchange="other", routing_key="x.y"))
    assert (env.exchange, env.routing_key) == ("other", "x.y")
    assert Router(exchange="events").route(row()).exchange == "events"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{aggregate_type}.{event_type}", "order.OrderCreated"),
        ("evt.{aggregate_type}.{aggregate_id}", "evt.order.42"),
        ("{id}", "0b9c6f3e-0000-4000-8000-000000000001"),
        ("static", "static"),
        ("r.{payload[region]}", "r.eu"),
    ],
)
def test_routing_key_templates(template: str, expected: str) -> None:
    r = row(payload=b'{"region": "eu"}')
    assert Router(routing_key_template=template).route(r).routing_key == expected


@pytest.mark.parametrize(
    ("template", "overrides", "message"),
    [
        ("{nope}", {}, "unknown field"),
        ("{payload[region]}", {}, "cannot be rendered"),
        ("{payload[region]}", {"payload": b"[1]"}, "cannot be rendered"),
    ],
)
def test_unrenderable_templates(template: str, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(UnmappableRow, match=message):
        Router(routing_key_template=template).route(row(**overrides))


@pytest.mark.parametrize("headers", [b"[1, 2]", b'"text"', b"42", b"{not json"])
def test_headers_must_be_a_json_object(headers: bytes) -> None:
    with pytest.raises(UnmappableRow, match="headers"):
        Router().route(row(headers=headers))


@pytest.mark.parametrize("exchange", ["has space", "x" * 128, "é"])
def test_invalid_exchange_names_are_unmappable(exchange: str) -> None:
    with pytest.raises(UnmappableRow, match="invalid exchange name"):
        Router().route(row(exchange=exchange))
    with pytest.raises(UnmappableRow, match="invalid exchange name"):
        Router(message_format="celery").route(
            row(exchange=exchange, payload=b'{"args": [], "kwargs": {}}')
        )


def test_routing_key_too_long() -> None:
    with pytest.raises(UnmappableRow, match="255"):
        Router().route(row(routing_key="k" * 256))


def test_row_reader_maps_by_name_with_extra_columns_and_other_order() -> None:
    names = ["extra", *reversed(COLUMNS)]
    values = (b"?", *reversed([b"id-1", b"t", b"a", b"e", b"{}", b"{}", None, None, b"ts"]))
    r = RowReader(names).read(values)
    assert (r.id, r.aggregate_type, r.aggregate_id, r.event_type) == ("id-1", "t", "a", "e")
    assert r.exchange is None and r.created_at == "ts"


def test_row_reader_minimal_columns() -> None:
    r = RowReader(["id", "aggregate_type", "aggregate_id", "event_type", "payload"]).read(
        (b"i", b"t", b"a", b"e", b"{}")
    )
    assert r.headers is None and r.routing_key is None
    assert Router().route(r).headers == {
        "aggregate_type": "t",
        "aggregate_id": "a",
        "event_type": "e",
    }


def test_row_reader_rejects_a_table_without_outbox_columns() -> None:
    with pytest.raises(OutboxSchemaError, match="payload"):
        RowReader(["id", "aggregate_type", "aggregate_id", "event_type"])


def test_null_in_a_required_column_is_unmappable() -> None:
    with pytest.raises(UnmappableRow):
        RowReader(COLUMNS).read((b"i", None, b"a", b"e", b"{}", b"{}", None, None, None))


@pytest.mark.parametrize("text", ["infinity", "-infinity", "", None, "4713-01-01 BC"])
def test_unparseable_timestamps_mean_no_timestamp(text: str | None) -> None:
    assert parse_timestamptz(text) is None


def test_celery_task_message() -> None:
    payload = b'{"args": [1, "x"], "kwargs": {"k": true}}'
    env = Router(message_format="celery").route(row(event_type="app.tasks.add", payload=payload))
    args, kwargs, embed = orjson.loads(env.body)
    assert (args, kwargs) == ([1, "x"], {"k": True})
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert env.exchange == "" and env.routing_key == "celery"
    assert env.headers["task"] == "app.tasks.add"
    assert env.headers["id"] == env.headers["root_id"] == env.message_id == env.correlation_id
    assert env.headers["lang"] == "py" and env.headers["retries"] == 0
    assert env.content_encoding == "utf-8"
    queued = Router(message_format="celery").route(row(payload=payload, routing_key="high"))
    assert queued.routing_key == "high"


@pytest.mark.parametrize("payload", [b"[1]", b'{"args": {}}', b'{"kwargs": []}', b"nope"])
def test_celery_payload_must_have_args_and_kwargs(payload: bytes) -> None:
    with pytest.raises(UnmappableRow, match="celery"):
        Router(message_format="celery").route(row(payload=payload))


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        Router(message_format="xml")


safe_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    safe_text,
    safe_text,
    safe_text,
    st.dictionaries(safe_text, st.integers(-(2**63), 2**63 - 1), max_size=4),
)
def test_any_text_round_trips(agg: str, event: str, agg_id: str, body: dict[str, int]) -> None:
    payload = orjson.dumps(body)
    env = Router().route(
        row(aggregate_type=agg, event_type=event, aggregate_id=agg_id, payload=payload)
    )
    assert env.body == payload
    assert env.routing_key == f"{agg}.{event}" or len(f"{agg}.{event}".encode()) > 255
    assert env.headers["aggregate_id"] == agg_id

"""An outbox row as a CloudEvent (1.0): `--format cloudevents` and `cloudevents-structured`.

Pure: no I/O. The router builds the ``event`` format's envelope first (exchange,
routing key, headers, checks) and this module turns it into a CloudEvent, so
both formats route alike and a ``cloudevents`` message is an ``event`` message
plus its CloudEvents attributes: ``event`` consumers keep working.

Binary mode follows the RabbitMQ protocol binding for CloudEvents (Knative's
eventing-rabbitmq ``cloudevents-protocol-spec``, implemented by the Python SDK's
``cloudevents.core.bindings.rabbitmq``): each attribute is an AMQP header named
``ce-<attribute>`` holding its canonical string, ``datacontenttype`` is the AMQP
``content_type``, the payload is the body unchanged. The AMQP 1.0 binding's
``cloudEvents_`` application properties are not used: RabbitMQ's own binding,
its SDKs and Knative's RabbitMQ source read ``ce-``. Structured mode is the JSON
event format, ``application/cloudevents+json``, with the payload embedded as
``data`` byte for byte.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import orjson

from cdc_relay.envelope import Envelope, check_headers
from cdc_relay.rows import OutboxRow, UnmappableRow

SPECVERSION: Final = "1.0"
HEADER_PREFIX: Final = "ce-"
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
# ``Router`` built without settings (tests, the template check) uses this source.
FALLBACK_SOURCE: Final = "/cdc-relay"
# The attributes the spec defines: a row header of such a name is never an attribute.
CONTEXT_ATTRIBUTES: Final = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "datacontenttype",
        "dataschema",
        "subject",
        "time",
        "data",
        "data_base64",
    }
)
# An extension attribute's name (spec 1.0: lowercase ASCII letters and digits, at most
# 20 characters); a row header of another name stays a plain header only.
EXTENSION_NAME: Final = re.compile(r"[a-z0-9]{1,20}")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1  # the spec's Integer type
# What a CloudEvents String must not hold: control characters, surrogates, noncharacters.
_NOT_STRING = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")
_JSON_MEDIA_TYPE = re.compile(r"(application|text)/([\w.\-]+\+)?json\s*(;|\Z)", re.IGNORECASE)
# Postgres timestamptz text in a UTC session, fraction without trailing zeros (as it prints it).
_UTC_TEXT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{0,5}[1-9])?\+00")
# Past this many bytes of source, subject and copied extension values, the headers get the
# whole table check again. Below it, what this mapping adds (with id and type at most 255
# bytes each) fits the room MAX_HEADER_TABLE_BYTES leaves in the frame for the properties,
# which a publish uses little of; a full check would double the mapping's cost.
_UNCHECKED_EXTRA_BYTES = 512
# What the router itself adds in event format: never extension names (they hold "_").
_ROUTER_HEADERS = frozenset({"aggregate_type", "aggregate_id", "event_type"})
# A URI-reference has no spaces or control characters; anything else is left to the operator.
_SOURCE = re.compile(r"[^\x00-\x20\x7f-\x9f]+")


def default_source(database: str, schema: str, table: str) -> str:
    """``/cdc-relay/<database>/<schema>.<table>``: one source per outbox, a URI-reference."""
    parts = (quote(database, safe=""), quote(schema, safe=""), quote(table, safe=""))
    return f"{FALLBACK_SOURCE}/{parts[0]}/{parts[1]}.{parts[2]}"


def check_source(source: str) -> None:
    """Raise ValueError (one line) unless ``source`` can be a CloudEvents source."""
    if not _SOURCE.fullmatch(source):
        raise ValueError(
            f"invalid CloudEvents source {source[:80]!r}: a non-empty URI-reference "
            "without spaces or control characters (e.g. /cdc-relay/app/public.outbox)"
        )


def rfc3339(created_at: str | None) -> str | None:
    """Postgres timestamptz (or timestamp, read as UTC) text -> RFC 3339 in UTC, or None.

    None where RFC 3339 cannot say it ('infinity', BC, past year 9999): the
    event then has no ``time`` (optional) rather than no message. Fractional
    seconds keep the digits Postgres wrote (it drops trailing zeros).
    """
    if not created_at:
        return None
    if _UTC_TEXT.fullmatch(created_at):  # what the relay's UTC sessions read: rewrite in place
        try:
            datetime.fromisoformat(created_at)  # a real date, not just its shape
        except ValueError:
            return None
        return f"{created_at[:10]}T{created_at[11:-3]}Z"
    try:
        value = datetime.fromisoformat(created_at)
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    text = value.replace(tzinfo=None, microsecond=0).isoformat()  # four-digit years
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _string(what: str, value: str) -> str:
    if _NOT_STRING.search(value):
        raise UnmappableRow(
            f"{what} {value[:40]!r} holds control characters or noncharacters, "
            "which a CloudEvents String cannot"
        )
    return value


def _extension_value(value: Any) -> str | bool | int | None:
    """The header value as a CloudEvents attribute value, or None if it cannot be one."""
    if isinstance(value, str):
        return None if _NOT_STRING.search(value) else value
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and INT32_MIN <= value <= INT32_MAX:
        return value
    return None


def _canonical(value: str | bool | int) -> str:
    """The attribute's canonical string, as binary bindings carry it."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def _check_json(payload: bytes) -> None:
    """Raise UnmappableRow unless ``payload`` is one JSON value (a text column may hold anything).

    orjson first (fast); the standard library where orjson is stricter than
    JSON (numbers beyond a double, which jsonb keeps), so valid jsonb passes.
    """
    try:
        orjson.loads(payload)
        return
    except orjson.JSONDecodeError:
        pass
    try:
        json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise UnmappableRow(
            "payload is not valid JSON (or nested too deep), so it cannot be the structured "
            f"event's data: {str(exc)[:200]}"
        ) from None


class CloudEvents:
    """Maps the ``event`` envelope of a row to a CloudEvent in one content mode.

    Attributes: ``id`` the row id, ``source`` as configured, ``type`` the event
    type, ``subject`` the aggregate id (left out when empty), ``time`` the row's
    ``created_at``, ``datacontenttype`` the envelope's content type. Each header
    whose name is a valid extension name (not one the spec defines) and whose
    value is a string, boolean or 32-bit integer is also an extension attribute
    (``traceparent``/``tracestate`` so become the distributed-tracing
    extension); every header stays a plain AMQP header as in ``event`` format.
    A row header named ``ce-...`` would read as an attribute: the row is refused.
    """

    __slots__ = ("_last_created", "_last_time", "_source_bytes", "source", "structured")

    def __init__(self, source: str, structured: bool) -> None:
        check_source(source)
        self.source = source
        self.structured = structured
        self._source_bytes = _utf8_len(source)
        self._last_created: str | None = None
        self._last_time: str | None = None

    def __call__(self, row: OutboxRow, event: Envelope) -> Envelope:
        """The CloudEvent for ``row`` from its ``event`` envelope (which it takes over)."""
        event_id, event_type, subject = event.message_id, row.event_type, row.aggregate_id
        if not event_type:
            raise UnmappableRow("empty event_type: a CloudEvent needs a type")
        if _NOT_STRING.search(event_id + event_type + subject):  # one search for the common case
            _string("id", event_id)
            _string("event_type", event_type)
            _string("aggregate_id", subject)
        if row.created_at != self._last_created:  # a transaction's rows share now()
            self._last_created, self._last_time = row.created_at, rfc3339(row.created_at)
        time = self._last_time
        extensions = _extensions(event.headers)
        if self.structured:
            attributes: dict[str, Any] = {
                "specversion": SPECVERSION,
                "id": event_id,
                "source": self.source,
                "type": event_type,
            }
            if subject:
                attributes["subject"] = subject
            if time is not None:
                attributes["time"] = time
            attributes.update(extensions)
            return _structured(row, event, attributes)
        headers = event.headers
        headers["ce-specversion"] = SPECVERSION
        headers["ce-id"] = event_id
        headers["ce-source"] = self.source
        headers["ce-type"] = event_type
        if subject:
            headers["ce-subject"] = subject
        if time is not None:
            headers["ce-time"] = time
        extra = self._source_bytes + _utf8_len(subject)
        for name, value in extensions.items():
            text = _canonical(value)
            headers[HEADER_PREFIX + name] = text
            extra += _utf8_len(text)
        if extra > _UNCHECKED_EXTRA_BYTES:
            check_headers(headers)
        return event


def _extensions(headers: dict[str, Any]) -> dict[str, str | bool | int]:
    """The headers that are also extension attributes; refuses a ``ce-`` header."""
    extensions: dict[str, str | bool | int] = {}
    for name, value in headers.items():
        if name in _ROUTER_HEADERS:
            continue
        if name[:3].lower() == HEADER_PREFIX:
            raise UnmappableRow(
                f"header {name[:40]!r}: names starting with {HEADER_PREFIX!r} are the "
                "CloudEvents attributes the relay writes; drop the prefix to make it an "
                "extension attribute"
            )
        if EXTENSION_NAME.fullmatch(name) and name not in CONTEXT_ATTRIBUTES:
            extension = _extension_value(value)
            if extension is not None:
                extensions[name] = extension
    return extensions


def _structured(row: OutboxRow, event: Envelope, attributes: dict[str, Any]) -> Envelope:
    """The JSON event format, the payload spliced in as ``data`` without re-encoding."""
    content_type = event.content_type
    attributes["datacontenttype"] = content_type
    if _JSON_MEDIA_TYPE.match(content_type):
        _check_json(row.payload)
        data = row.payload
    else:  # the JSON event format carries other text as a JSON string
        data = orjson.dumps(row.payload.decode("utf-8", "replace"))
    head = orjson.dumps(attributes)
    event.body = b"".join((head[:-1], b',"data":', data, b"}"))
    event.content_type = STRUCTURED_CONTENT_TYPE
    return event

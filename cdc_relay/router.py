"""Outbox row -> AMQP envelope: the routing and publishing policy
(docs/architecture.md, "The life of a row").

Pure: no I/O. The payload (jsonb text) becomes the body as is, without parsing
or re-encoding. The row model lives in ``cdc_relay.rows``, the envelope and its
limits in ``cdc_relay.envelope``, the Celery task mapping in
``cdc_relay.celery_message``; this module decides where each row goes.

The checks reached from here are the one rule for "can the relay ever publish
this?": the relay dead-letters a row that fails them, and ``cdc_relay.outbox``
runs the same checks at enqueue time so the application hears about it while it
can still fix the call.
"""

from __future__ import annotations

import fnmatch
import re
import string
import urllib.parse
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from cdc_relay.celery_message import TASK_AGGREGATE_TYPE, celery_envelope
from cdc_relay.cloudevents import FALLBACK_SOURCE, CloudEvents
from cdc_relay.envelope import (
    MAX_ROUTING_KEY_BYTES,
    Envelope,
    check_headers,
    check_routing_key_size,
    check_short_string,
    parse_timestamptz,
    read_headers,
)
from cdc_relay.layout import DEFAULT_LAYOUT, Layout, build_layout
from cdc_relay.properties import RESERVED_HEADERS, take_properties, trace_headers
from cdc_relay.rows import OutboxRow, UnmappableRow

if TYPE_CHECKING:
    from cdc_relay.config import Settings

# AMQP 0-9-1 exchange-name domain; anything else the broker refuses with a
# channel error, which would stall the stream instead of dead-lettering the row.
EXCHANGE_NAME = re.compile(r"^[a-zA-Z0-9\-_.:]{0,127}\Z")  # \Z: "$" lets "x\n" through
# Names RabbitMQ reads as sender-selected distribution: a row could route copies
# to any queue the relay may write to, so they are refused unless allowed.
SENDER_SELECTED_HEADERS = ("CC", "BCC")
# How --allowed-exchanges names the default exchange "" (every queue by its name):
# no glob matches it, so a list of named exchanges never lets a row reach any queue.
DEFAULT_EXCHANGE_PATTERN = "(default)"
FORMATS = ("event", "celery", "cloudevents", "cloudevents-structured")
# What a routing-key template may name (the root of ``{payload[region]}`` is payload).
TEMPLATE_FIELDS = frozenset({"id", "aggregate_type", "aggregate_id", "event_type", "payload"})
# The row check_template renders: any template over these fields renders any row alike.
_SAMPLE_ROW = OutboxRow("00000000-0000-0000-0000-000000000000", "order", "1", "Created", b"{}")


class _TemplateValues(dict[str, Any]):
    """format_map source that parses the payload only when the template asks for it."""

    def __init__(self, row: OutboxRow) -> None:
        super().__init__(
            id=row.id,
            aggregate_type=row.aggregate_type,
            aggregate_id=row.aggregate_id,
            event_type=row.event_type,
        )
        self._row = row

    def __missing__(self, key: str) -> Any:
        if key == "payload":
            value = orjson.loads(self._row.payload)
            self["payload"] = value
            return value
        raise UnmappableRow(f"routing-key template refers to unknown field {{{key}}}")


def _check_format_spec(template: str, spec: str) -> None:
    """Refuse a width or precision over MAX_ROUTING_KEY_BYTES, and nested fields in a spec.

    ``{id!r:>99999999999}`` died with a MemoryError while rendering; no key
    longer than 255 bytes can be published anyway, so a larger number is a
    mistake. A nested field (``{id:>{aggregate_id}}``) would take the width
    from each row, so it is refused too.
    """
    if "{" in spec or "}" in spec:
        raise ValueError(
            f"invalid routing-key template {template!r}: a format spec cannot hold a field"
        )
    for number in re.findall(r"\d+", spec):
        if int(number) > MAX_ROUTING_KEY_BYTES:
            raise ValueError(
                f"invalid routing-key template {template!r}: width or precision {number} "
                f"over {MAX_ROUTING_KEY_BYTES} (the longest routing key)"
            )


class Router:
    """Turns outbox rows into envelopes with the relay's configured defaults.

    The one publishing policy of every command that publishes (``run``,
    ``resync``, ``dead-letters replay``): ``allowed_exchanges`` (see
    ``exchange_allowed``; empty = any) bounds the exchange each message actually
    goes to, after defaults, the default exchange ``""`` of a Celery task
    included; ``CC``/``BCC`` headers are refused unless ``allow_cc_headers``;
    a body over ``max_message_size`` (None: no limit) is refused.
    """

    def __init__(
        self,
        exchange: str = "outbox",
        routing_key_template: str = "{aggregate_type}.{event_type}",
        message_format: str = "event",
        allowed_exchanges: Sequence[str] = (),
        allow_cc_headers: bool = False,
        max_message_size: int | None = None,
        ce_source: str = FALLBACK_SOURCE,
        layout: Layout = DEFAULT_LAYOUT,
        amqp_users: Collection[str] | None = None,
    ) -> None:
        if message_format not in FORMATS:
            raise ValueError(f"unknown message format {message_format!r}; use one of {FORMATS}")
        try:
            parsed = list(string.Formatter().parse(routing_key_template))
        except ValueError as exc:
            raise ValueError(
                f"invalid routing-key template {routing_key_template!r}: {exc}"
            ) from None
        for _, field, spec, _ in parsed:
            if field is not None and spec:
                _check_format_spec(routing_key_template, spec)
        fields = [f for _, f, _, _ in parsed if f]
        self.exchange = exchange
        self.routing_key_template = routing_key_template
        self.message_format = message_format
        self.allowed_exchanges = tuple(allowed_exchanges)
        self.allow_cc_headers = allow_cc_headers
        self.max_message_size = max_message_size
        self._cloudevents = (
            CloudEvents(ce_source, structured=message_format == "cloudevents-structured")
            if message_format.startswith("cloudevents")
            else None
        )
        # Which column holds which field (rows.RowReader reads with it), and the users
        # a row's user_id property may name (None: not checked, the app side's router).
        self.layout = layout
        self.amqp_users = None if amqp_users is None else frozenset(amqp_users)
        # The default template is so common that it gets a fast path.
        self._fast_template = fields == ["aggregate_type", "event_type"] and (
            routing_key_template == "{aggregate_type}.{event_type}"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Router:
        """The relay's router: one place that turns settings into mapping rules."""
        return cls(
            settings.exchange,
            settings.routing_key,
            settings.message_format,
            allowed_exchanges=settings.allowed_exchanges,
            allow_cc_headers=settings.allow_cc_headers,
            max_message_size=settings.max_message_size,
            ce_source=settings.cloudevents_source,
            layout=build_layout(settings.layout, settings.column, settings.header_column),
            amqp_users=amqp_users(settings.amqp_urls),
        )

    def route(self, row: OutboxRow) -> Envelope:
        """The envelope for this row, or UnmappableRow (one line) if the policy refuses it."""
        envelope = self._envelope(row)
        self._check_exchange(envelope.exchange)
        limit = self.max_message_size
        if limit is not None and len(envelope.body) > limit:
            raise UnmappableRow(
                f"message body of {len(envelope.body)} bytes exceeds the maximum message size "
                f"{limit} (--max-message-size or the broker's max_message_size)"
            )
        return envelope

    def _envelope(self, row: OutboxRow) -> Envelope:
        if not row.id:
            raise UnmappableRow("empty message id: consumers and returns need one")
        headers = read_headers(row)
        if row.column_headers or row.trace_context:
            headers = _with_columns(headers, row)
        if headers and not self.allow_cc_headers:
            _refuse_sender_selected(headers)
        if row.exchange is not None and not EXCHANGE_NAME.match(row.exchange):
            raise UnmappableRow(f"invalid exchange name {row.exchange[:140]!r}")
        if self.message_format == "celery" or row.aggregate_type == TASK_AGGREGATE_TYPE:
            return celery_envelope(row, headers)
        routing_key = row.routing_key
        if routing_key is None:
            routing_key = self.render_routing_key(row)
        check_routing_key_size(routing_key)
        check_short_string("id", row.id)
        check_short_string("event_type", row.event_type)
        properties = (
            take_properties(headers, row.properties, self.amqp_users)
            if (headers and not RESERVED_HEADERS.isdisjoint(headers)) or row.properties
            else None
        )
        headers["aggregate_type"] = row.aggregate_type
        headers["aggregate_id"] = row.aggregate_id
        headers["event_type"] = row.event_type
        envelope = Envelope(
            exchange=self.exchange if row.exchange is None else row.exchange,
            routing_key=routing_key,
            body=row.payload,
            message_id=row.id,
            type=row.event_type,
            headers=headers,
            timestamp=parse_timestamptz(row.created_at),
        )
        if properties:
            for name, value in properties.items():
                setattr(envelope, name, value)
        if self._cloudevents is not None:
            return self._cloudevents(row, envelope)
        return envelope

    def render_routing_key(self, row: OutboxRow) -> str:
        if self._fast_template:
            return f"{row.aggregate_type}.{row.event_type}"
        try:
            return self.routing_key_template.format_map(_TemplateValues(row))
        except UnmappableRow:
            raise
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
            raise UnmappableRow(
                f"routing-key template {self.routing_key_template!r} cannot be rendered: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        except RecursionError:  # a {payload[...]} value nested too deep to print
            raise UnmappableRow(
                f"routing-key template {self.routing_key_template!r} cannot be rendered: "
                "the value is nested too deep"
            ) from None

    def check_template(self) -> None:
        """Render the routing-key template once, so a typo is a startup error, not N dead letters.

        Raises ValueError (one line) for a field that no row has or a template
        that cannot render a sample row. A template that reads ``{payload...}``
        depends on each row's payload, so it is not rendered: such rows are
        dead-lettered one by one. (Syntax, widths and nested fields were already
        checked when the router was made.)
        """
        template = self.routing_key_template
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        roots = [re.split(r"[.\[]", f, maxsplit=1)[0] for f in fields]
        for root in roots:
            if root not in TEMPLATE_FIELDS:
                known = ", ".join("{" + k + "}" for k in sorted(TEMPLATE_FIELDS))
                raise ValueError(f"unknown field {{{root}}}; use {known}")
        if "payload" in roots:
            return
        self.render_routing_key(_SAMPLE_ROW)  # UnmappableRow is a ValueError

    def _check_exchange(self, exchange: str) -> None:
        if not exchange_allowed(self.allowed_exchanges, exchange):
            allowed = ", ".join(self.allowed_exchanges)
            what = "the default exchange ''" if exchange == "" else f"exchange {exchange!r}"
            hint = f"; list {DEFAULT_EXCHANGE_PATTERN} to allow it" if exchange == "" else ""
            raise UnmappableRow(f"{what} is not allowed (allowed: {allowed}){hint}")


def exchange_allowed(patterns: Sequence[str], exchange: str) -> bool:
    """May a message go to ``exchange`` under ``--allowed-exchanges`` ``patterns``?

    Empty: any exchange. Otherwise case-sensitive glob patterns (as exchange
    names are); the default exchange ``""`` matches only the pattern
    ``(default)``, never a glob: ``*`` means every named exchange, and a
    Celery task without an exchange must not reach any queue by name unless
    the operator said so.
    """
    if not patterns:
        return True
    if exchange == "":
        return DEFAULT_EXCHANGE_PATTERN in patterns
    return any(fnmatch.fnmatchcase(exchange, p) for p in patterns)


def amqp_users(urls: Sequence[str]) -> frozenset[str]:
    """The users the relay connects as: a row's user_id must be one of them.

    Empty when that cannot be known (a certificate login, whose user is the
    certificate's subject), so that every user_id is refused up front rather
    than by the broker closing the channel. Several URLs may name several users
    (cluster nodes): a user_id must then name every one, so the set is empty too.
    """
    users = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if "auth_mechanism=external" in parts.query.lower():
            return frozenset()
        users.add(urllib.parse.unquote(parts.username or "guest"))
    return frozenset(users) if len(users) == 1 else frozenset()


def _with_columns(headers: dict[str, Any], row: OutboxRow) -> dict[str, Any]:
    """The headers column plus --header-column values and the trace context (which win)."""
    if row.column_headers:
        headers.update(row.column_headers)
    if row.trace_context:
        headers.update(trace_headers(row.trace_context))
    check_headers(headers)
    return headers


def _refuse_sender_selected(headers: dict[str, Any]) -> None:
    for name in SENDER_SELECTED_HEADERS:
        if name in headers:
            raise UnmappableRow(
                f"header {name!r} selects extra destinations (sender-selected distribution);"
                " the relay refuses it unless CC/BCC headers are allowed"
            )

"""Per-row AMQP properties: reserved header names and mapped columns, checked.

Pure: no I/O. A row sets ``correlation_id``, ``reply_to``, ``expiration``,
``priority``, ``content_type``, ``content_encoding``, ``type``, ``app_id`` or
``user_id`` through a header of that name (taken out of the header table) or
a column mapped with ``--column``; a mapped column wins over the header.
Every value is checked here, because a value the broker refuses closes the
channel (RabbitMQ: PRECONDITION_FAILED for a bad ``expiration`` or a
``user_id`` that is not the connection's user), which would end every session
at the same row: such a row is a dead letter with the reason instead.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from cdc_relay.envelope import MAX_SHORT_STRING_BYTES
from cdc_relay.layout import PROPERTY_FIELDS
from cdc_relay.rows import UnmappableRow

# The header names a row sets properties with (checked first, in one set test per row).
RESERVED_HEADERS = frozenset(PROPERTY_FIELDS)
MAX_PRIORITY = 255  # an AMQP octet
# RabbitMQ refuses a per-message TTL above 2^32 - 1 ms (and any non-integer).
MAX_EXPIRATION_MS = 2**32 - 1


def take_properties(
    headers: dict[str, Any],
    mapped: Mapping[str, str] | None,
    users: Collection[str] | None,
) -> dict[str, Any]:
    """The Envelope keyword arguments this row's properties give; reserved headers removed.

    ``users``: the AMQP users the relay may connect as (``user_id`` must be one
    of them; empty: unknown, so any ``user_id`` is refused), or None to skip
    that check (the app side cannot know which user the relay connects as).
    Raises UnmappableRow naming the property and the rule.
    """
    found: dict[str, Any] = {}
    if headers:
        for name in PROPERTY_FIELDS:
            if name in headers:
                found[name] = headers.pop(name)
    if mapped:
        found.update(mapped)
    if not found:
        return {}
    result: dict[str, Any] = {}
    for name, value in found.items():
        if value is None:
            continue
        if name == "priority":
            result[name] = _priority(value)
        elif name == "expiration":
            result[name] = _expiration(value)
        else:
            result[name] = _short_string(name, value)
    user = result.get("user_id")
    if user is not None and users is not None and user not in users:
        if not users:
            why = (
                "the relay's AMQP user is not known (auth_mechanism=external, "
                "or URLs with different users)"
            )
        else:
            why = f"the relay connects as {sorted(users)[0]!r}"
        raise UnmappableRow(
            f"property user_id {user[:80]!r} is not the connection's user: RabbitMQ would refuse "
            f"the publish (PRECONDITION_FAILED); {why}"
        )
    return result


def _short_string(name: str, value: Any) -> str:
    if type(value) is not str:
        raise UnmappableRow(f"property {name} must be a string, got {type(value).__name__}")
    if len(value.encode()) > MAX_SHORT_STRING_BYTES:
        raise UnmappableRow(
            f"property {name} longer than {MAX_SHORT_STRING_BYTES} bytes: {value[:40]!r}..."
        )
    return value


def _integer(name: str, value: Any) -> int:
    """A JSON integer, or the decimal digits of a text column."""
    if type(value) is int:
        return value
    if type(value) is str and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    raise UnmappableRow(f"property {name} must be a non-negative integer, got {str(value)[:40]!r}")


def _priority(value: Any) -> int:
    number = _integer("priority", value)
    if not 0 <= number <= MAX_PRIORITY:
        raise UnmappableRow(f"property priority must be 0-{MAX_PRIORITY}, got {number}")
    return number


def _expiration(value: Any) -> str:
    """Milliseconds as a decimal string: the one form RabbitMQ takes."""
    number = _integer("expiration", value)
    if not 0 <= number <= MAX_EXPIRATION_MS:
        raise UnmappableRow(
            f"property expiration must be 0-{MAX_EXPIRATION_MS} milliseconds, got {number}"
        )
    return str(number)


# W3C traceparent: version-traceid-parentid-flags, lowercase hex.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
MAX_TRACESTATE_BYTES = 512  # W3C: at most 32 members; vendors keep it far shorter


def trace_headers(text: str) -> dict[str, str]:
    """``traceparent``/``tracestate`` from a trace-context column (``tracingspancontext``).

    Debezium writes the span context as Java properties text (``#`` comments,
    ``traceparent=00-...`` lines); a bare ``traceparent`` value is taken too.
    Empty text means no trace; anything else without a valid ``traceparent``
    raises UnmappableRow (a consumer would otherwise lose the trace unnoticed).
    """
    if not text.strip():
        return {}
    found: dict[str, str] = {}
    stripped = text.strip()
    if _TRACEPARENT.match(stripped):
        found["traceparent"] = stripped
    else:
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#!":
                continue
            key, _, value = line.partition("=")
            key = key.strip()
            if key in ("traceparent", "tracestate"):
                found[key] = value.strip()
    parent = found.get("traceparent")
    if parent is None or not _TRACEPARENT.match(parent):
        raise UnmappableRow(
            f"trace context {text[:80]!r} holds no valid W3C traceparent "
            "(expected traceparent=00-<32 hex>-<16 hex>-<2 hex>)"
        )
    state = found.get("tracestate")
    if state == "":
        del found["tracestate"]
    elif state is not None and len(state.encode()) > MAX_TRACESTATE_BYTES:
        raise UnmappableRow(f"tracestate longer than {MAX_TRACESTATE_BYTES} bytes")
    return found

"""A Celery task message (protocol 2) from an outbox row (docs/guides/celery.md).

Pure: no I/O. The router sends a row here when the relay's format is
``celery`` or the row's aggregate_type is ``TASK_AGGREGATE_TYPE``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson

from cdc_relay.envelope import (
    APP_ID,
    Envelope,
    check_header_value,
    check_headers,
    check_routing_key_size,
    check_short_string,
    parse_timestamptz,
)
from cdc_relay.rows import OutboxRow, UnmappableRow

# Celery's own default for argsrepr/kwargsrepr (app.amqp.argsrepr_maxsize).
CELERY_REPR_MAXSIZE = 1024
CELERY_REPR_MAXLEVELS = 3  # Celery's task_repr_maxlevels default
# A row with this aggregate_type is a Celery task in the default "event" format:
# one outbox, one slot and one relay carry events and tasks (docs/guides/celery.md).
TASK_AGGREGATE_TYPE = "celery.task"


def celery_repr(value: Iterable[Any] | dict[str, Any]) -> str:
    """argsrepr/kwargsrepr exactly as Celery makes them: saferepr, 1024 chars, 3 levels.

    Truncated so a big argument cannot push the header block past frame_max.
    Without Celery installed (a relay that only forwards), reprlib gives the
    same bounds.
    """
    try:
        from celery.utils.saferepr import saferepr
    except ImportError:  # pragma: no cover - Celery is a test dependency
        return _fallback_repr(value)
    return str(saferepr(value, CELERY_REPR_MAXSIZE, maxlevels=CELERY_REPR_MAXLEVELS))


def _fallback_repr(value: Any) -> str:
    import reprlib

    short = reprlib.Repr()
    short.maxlevel = CELERY_REPR_MAXLEVELS
    short.maxstring = CELERY_REPR_MAXSIZE
    text = short.repr(value)
    return text if len(text) <= CELERY_REPR_MAXSIZE else text[: CELERY_REPR_MAXSIZE - 3] + "..."


def _is_iso8601(value: Any) -> bool:
    """What the worker can parse; anything else would fail the task on every delivery."""
    if type(value) is not str:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def celery_envelope(row: OutboxRow, headers: dict[str, Any]) -> Envelope:
    """A Celery task message (protocol 2) from an outbox row.

    event_type is the task name, payload is ``{"args": [...], "kwargs": {...}}``
    plus optional ``eta``/``expires`` (ISO 8601), ``priority`` (0-255),
    ``root_id``/``parent_id``; routing_key (row or default ``celery``) is the
    queue, exchange defaults to the direct default exchange ``""`` unless the
    row names one (Celery's own choice for a direct queue). The outbox id
    becomes the task id, so a redelivered task keeps its identity.
    """
    try:
        payload = orjson.loads(row.payload)
    except orjson.JSONDecodeError as exc:
        raise UnmappableRow(f"celery payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise UnmappableRow("celery payload must be an object with args/kwargs")
    args = payload.get("args", [])
    kwargs = payload.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise UnmappableRow("celery payload needs args (array) and kwargs (object)")
    task_id = row.id
    check_short_string("id", task_id)
    eta, expires = payload.get("eta"), payload.get("expires")
    for name, value in (("eta", eta), ("expires", expires)):
        check_header_value(name, value)
        if value is not None and not _is_iso8601(value):
            raise UnmappableRow(
                f"celery header {name} must be an ISO 8601 string or null: {value!r:.60}"
            )
    priority = payload.get("priority")
    if priority is not None and not (type(priority) is int and 0 <= priority <= 255):
        raise UnmappableRow(f"celery priority must be an integer 0-255, got {priority!r}")
    root_id = payload.get("root_id") or task_id
    parent_id = payload.get("parent_id")
    for name, value in (("root_id", root_id), ("parent_id", parent_id)):
        if value is not None and not isinstance(value, str):
            raise UnmappableRow(f"celery {name} must be a string, got {value!r}")
    try:
        body = orjson.dumps(
            [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        )
    except orjson.JSONEncodeError as exc:
        raise UnmappableRow(f"celery args/kwargs cannot be encoded: {exc}") from None
    celery_headers: dict[str, Any] = {
        "lang": "py",
        "task": row.event_type,
        "id": task_id,
        "shadow": None,
        "eta": eta,
        "expires": expires,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": root_id,
        "parent_id": parent_id,
        "argsrepr": celery_repr(tuple(args)),
        "kwargsrepr": celery_repr(kwargs),
        "origin": APP_ID,
        "ignore_result": False,
    }
    celery_headers.update(headers)
    check_headers(celery_headers)
    routing_key = row.routing_key or "celery"
    check_routing_key_size(routing_key)
    return Envelope(
        exchange=row.exchange if row.exchange is not None else "",
        routing_key=routing_key,
        body=body,
        message_id=task_id,
        type=None,
        headers=celery_headers,
        timestamp=parse_timestamptz(row.created_at),
        content_encoding="utf-8",
        correlation_id=task_id,
        priority=priority,
    )

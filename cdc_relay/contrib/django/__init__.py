"""cdc-relay for Django: a migration for the outbox (and inbox) table, and the
enqueue helpers on Django's own connection, inside ``transaction.atomic()``.

Settings (all optional): ``CDC_RELAY_TABLE`` (default ``public.outbox``),
``CDC_RELAY_INBOX_TABLE`` (default ``public.processed_messages``). The
migration creates the tables; ``cdc-relay init`` still creates the
publication, the slot and the dead-letter table (its CREATE TABLE IF NOT
EXISTS leaves the migrated table alone).

Everything runs in the caller's transaction: a row exists if and only if the
surrounding ``atomic()`` block commits. Outside one (Django's autocommit) the
helpers refuse, because the row would be published even if the request fails.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from cdc_relay import inbox, outbox
from cdc_relay.outbox import EnqueueError

__all__ = ["EnqueueError", "enqueue", "enqueue_task", "inbox_table", "once", "outbox_table"]


def outbox_table() -> str:
    from django.conf import settings

    return str(getattr(settings, "CDC_RELAY_TABLE", outbox.DEFAULT_TABLE))


def inbox_table() -> str:
    from django.conf import settings

    return str(getattr(settings, "CDC_RELAY_INBOX_TABLE", inbox.DEFAULT_TABLE))


def _connection(using: str | None) -> Any:
    from django.db import DEFAULT_DB_ALIAS, connections

    return connections[using or DEFAULT_DB_ALIAS]


def _execute(insert: outbox.Insert, using: str | None) -> str:
    connection = _connection(using)
    if connection.get_autocommit() and not connection.in_atomic_block:
        raise EnqueueError(
            "outside transaction.atomic(): the row would be published even if the rest of"
            " the request fails; wrap the writes and the enqueue in `with transaction.atomic():`"
        )
    with connection.cursor() as cursor:
        cursor.execute(insert.sql("format"), insert.values)
    return insert.id


def enqueue(
    aggregate_type: str,
    aggregate_id: str | int | uuid.UUID,
    event_type: str,
    payload: Any,
    *,
    headers: Mapping[str, Any] | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    table: str | None = None,
    using: str | None = None,
) -> str:
    """``cdc_relay.outbox.enqueue`` on Django's connection ``using``; returns the message id."""
    insert = outbox.prepare_event(
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        headers=headers,
        exchange=exchange,
        routing_key=routing_key,
        table=table or outbox_table(),
    )
    return _execute(insert, using)


def enqueue_task(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    queue: str = "celery",
    countdown: float | None = None,
    eta: datetime | None = None,
    expires: float | datetime | None = None,
    priority: int | None = None,
    table: str | None = None,
    using: str | None = None,
) -> str:
    """A durable ``delay_on_commit`` on Django's connection; returns the task id."""
    insert = outbox.prepare_task(
        name,
        args,
        kwargs,
        queue=queue,
        countdown=countdown,
        eta=eta,
        expires=expires,
        priority=priority,
        table=table or outbox_table(),
    )
    return _execute(insert, using)


@contextlib.contextmanager
def once(message_id: str, *, using: str | None = None, table: str | None = None) -> Iterator[bool]:
    """``cdc_relay.inbox.once`` in a ``transaction.atomic()`` block of connection ``using``."""
    from django.db import transaction

    connection = _connection(using)
    query = inbox._insert_sql(table or inbox_table(), "format")
    with transaction.atomic(using=connection.alias):
        with connection.cursor() as cursor:
            cursor.execute(query, (inbox._check_id(message_id),))
            first = cursor.fetchone() is not None
        yield first

"""cdc_relay.contrib.django in a minimal project against the throwaway Postgres,
and through the default relay to a real Celery worker."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc_relay.router import Router
from tests.apps.celery_stack import RECORD, Stack, stack
from tests.apps.schema import create_outbox, drop_table, read_rows, unique_table

__all__ = ["stack"]  # the module-scoped fixture

django = pytest.importorskip("django")


pytestmark = pytest.mark.integration  # its fixtures start their own servers


@pytest.fixture(scope="module")
def project(stack: Stack) -> Iterator[None]:
    """django.setup() once per process, on the same Postgres as the relay."""
    from django.conf import settings

    if not settings.configured:
        os.environ["CDC_RELAY_TEST_DJANGO_DSN"] = stack.dsn
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.apps.django_settings"
        django.setup()
    yield
    from django.db import connections

    connections.close_all()


def columns(dsn: str, table: str) -> list[tuple[Any, ...]]:
    schema, name = table.split(".")
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
            " ORDER BY ordinal_position",
            (schema, name),
        ).fetchall()


def test_migration_creates_the_outbox_of_sql_outbox_sql_and_the_inbox(
    project: None, stack: Stack
) -> None:
    from django.core.management import call_command
    from django.test import override_settings

    migrated, inbox_table, reference = unique_table("dj"), unique_table("djinbox"), unique_table()
    create_outbox(stack.dsn, reference)  # from the shipped DDL file
    try:
        with override_settings(CDC_RELAY_TABLE=migrated, CDC_RELAY_INBOX_TABLE=inbox_table):
            call_command("migrate", "cdc_relay", "zero", verbosity=0)  # after an aborted run
            call_command("migrate", "cdc_relay", verbosity=0)
            try:
                assert columns(stack.dsn, migrated) == columns(stack.dsn, reference)
                assert [c[0] for c in columns(stack.dsn, inbox_table)] == [
                    "message_id",
                    "processed_at",
                ]
            finally:
                call_command("migrate", "cdc_relay", "zero", verbosity=0)
        assert columns(stack.dsn, migrated) == [] and columns(stack.dsn, inbox_table) == []
    finally:
        drop_table(stack.dsn, reference)


def key() -> str:
    return uuid.uuid4().hex[:12]


@pytest.mark.timeout(120)
def test_atomic_commit_runs_the_task_an_exception_never(project: None, stack: Stack) -> None:
    from django.db import transaction

    from cdc_relay.contrib.django import enqueue, enqueue_task

    committed, failed, after = key(), key(), key()
    table = stack.setup.table
    with transaction.atomic():
        task_id = enqueue_task(RECORD, [committed], queue=stack.queue, table=table)
        event_id = enqueue("order", 7, "Paid", {"k": committed}, table=table)
    with pytest.raises(RuntimeError), transaction.atomic():
        enqueue_task(RECORD, [failed], queue=stack.queue, table=table)
        raise RuntimeError("the view failed after enqueueing")
    with transaction.atomic():
        enqueue_task(RECORD, [after], queue=stack.queue, table=table)
    stack.wait_for([committed, after])
    assert [t for t, _ in stack.effects_of(committed)] == [task_id]
    assert stack.effects_of(failed) == []
    (event,) = read_rows(stack.dsn, table, [event_id])
    assert Router().route(event).routing_key == "order.Paid"


def test_outside_atomic_is_refused(project: None, stack: Stack) -> None:
    from cdc_relay.contrib.django import EnqueueError, enqueue, enqueue_task

    with pytest.raises(EnqueueError, match="atomic"):
        enqueue("order", 1, "A", {}, table=stack.setup.table)
    with pytest.raises(EnqueueError, match="atomic"):
        enqueue_task(RECORD, [], table=stack.setup.table)


def test_using_another_alias(project: None, stack: Stack) -> None:
    from django.db import transaction

    from cdc_relay.contrib.django import EnqueueError, enqueue

    table = unique_table()
    create_outbox(stack.dsn, table)
    try:
        with transaction.atomic(using="other"):
            kept = enqueue("order", 1, "A", {}, table=table, using="other")
        with transaction.atomic(using="other"):
            dropped = enqueue("order", 1, "B", {}, table=table, using="other")
            transaction.set_rollback(True, using="other")
        with transaction.atomic(), pytest.raises(EnqueueError, match="atomic"):
            enqueue("order", 1, "C", {}, table=table, using="other")  # "other" is not atomic
        assert [r.id for r in read_rows(stack.dsn, table)] == [kept]
        assert dropped != kept
    finally:
        drop_table(stack.dsn, table)


def test_django_once(project: None, stack: Stack) -> None:
    from django.db import connection

    from cdc_relay import inbox
    from cdc_relay.contrib.django import once

    inbox_table = unique_table("djinbox")
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        conn.execute(inbox.ddl(inbox_table))
    try:
        seen = []
        for message_id in ("a", "a", "b"):
            with once(message_id, table=inbox_table) as first:
                seen.append(first)
        with pytest.raises(RuntimeError), once("c", table=inbox_table):
            raise RuntimeError("handler failed")
        assert seen == [True, False, True]
        assert connection.get_autocommit()  # nothing left open
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            ids = [r[0] for r in conn.execute(f"SELECT message_id FROM {inbox_table} ORDER BY 1")]
        assert ids == ["a", "b"]
    finally:
        drop_table(stack.dsn, inbox_table)

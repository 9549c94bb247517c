"""Celery tasks through the outbox, end to end: ``enqueue_task`` -> the default
relay (event format, the same slot as events) -> RabbitMQ -> a REAL Celery
worker (``task_acks_late=True``) -> effects in Postgres.

One relay and one worker per module (a worker boots in seconds); each test
uses its own keys.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import aio_pika
import psycopg
import pytest

from cdc_relay.outbox import enqueue, enqueue_task
from cdc_relay.router import Router
from tests.apps.celery_stack import RECORD, RECORD_ONCE, Stack, stack
from tests.apps.schema import read_rows

__all__ = ["stack"]  # the module-scoped fixture

pytestmark = pytest.mark.integration  # the stack starts its own servers


def key() -> str:
    return uuid.uuid4().hex[:12]


@pytest.mark.timeout(120)
def test_committed_task_runs_rolled_back_never(stack: Stack) -> None:
    committed, rolled_back, after = key(), key(), key()
    with psycopg.connect(stack.dsn) as conn:
        task_id = enqueue_task(
            conn, RECORD, [committed], queue=stack.queue, table=stack.setup.table
        )
        # Events and tasks share the outbox, the slot and the relay.
        enqueue(conn, "order", 1, "Created", {"k": committed}, table=stack.setup.table)
        conn.commit()
        enqueue_task(conn, RECORD, [rolled_back], queue=stack.queue, table=stack.setup.table)
        conn.rollback()
        enqueue_task(conn, RECORD, [after], queue=stack.queue, table=stack.setup.table)
        conn.commit()
    stack.wait_for([committed, after])
    assert [t for t, _ in stack.effects_of(committed)] == [task_id]
    # The worker is solo and the queue ordered: had it existed, it would have run before `after`.
    assert stack.effects_of(rolled_back) == []


@pytest.mark.timeout(120)
def test_countdown_is_honoured(stack: Stack) -> None:
    later, now = key(), key()
    with psycopg.connect(stack.dsn) as conn:
        enqueue_task(conn, RECORD, [later], queue=stack.queue, countdown=4, table=stack.setup.table)
        enqueue_task(conn, RECORD, [now], queue=stack.queue, table=stack.setup.table)
        conn.commit()
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        assert row is not None
        committed_at = row[0]
    stack.wait_for([later, now])
    (_, ran_later), (_, ran_now) = stack.effects_of(later)[0], stack.effects_of(now)[0]
    assert ran_now < ran_later  # the worker held the eta task and ran the next one meanwhile
    assert (ran_later - committed_at).total_seconds() >= 3.5
    assert (ran_later - committed_at).total_seconds() < 30


async def _publish_again(amqp_url: str, rows: list[Any]) -> None:
    """Deliver the relay's exact messages a second time, as a replay after a crash would."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for row in rows:
            env = Router().route(row)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    env.body,
                    headers=env.headers,
                    content_type=env.content_type,
                    content_encoding=env.content_encoding,
                    delivery_mode=env.delivery_mode,
                    priority=env.priority,
                    correlation_id=env.correlation_id,
                    message_id=env.message_id,
                    timestamp=env.timestamp,
                    app_id=env.app_id,
                ),
                routing_key=env.routing_key,
            )
    finally:
        await connection.close()


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_inbox_decorator_makes_a_duplicate_delivery_a_no_op(stack: Stack) -> None:
    guarded, plain, marker = key(), key(), key()
    with psycopg.connect(stack.dsn) as conn:
        ids = [
            enqueue_task(conn, RECORD_ONCE, [guarded], queue=stack.queue, table=stack.setup.table),
            enqueue_task(conn, RECORD, [plain], queue=stack.queue, table=stack.setup.table),
        ]
        conn.commit()
    stack.wait_for([guarded, plain])
    await _publish_again(stack.setup.amqp_url, read_rows(stack.dsn, stack.setup.table, ids))
    with psycopg.connect(stack.dsn) as conn:
        enqueue_task(conn, RECORD, [marker], queue=stack.queue, table=stack.setup.table)
        conn.commit()
    stack.wait_for([marker])  # queued after the duplicates: they have been handled
    assert len(stack.effects_of(plain)) == 2  # the duplicate really was delivered and ran
    assert [t for t, _ in stack.effects_of(guarded)] == [ids[0]]  # ... but had no effect here
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {stack.inbox} WHERE message_id = %s", (ids[0],)
        ).fetchone()
    assert row is not None and row[0] == 1
    assert "already processed" in stack.worker_log.read_text()


@pytest.mark.timeout(180)
def test_relay_killed_mid_stream_every_task_runs_and_takes_effect_once(stack: Stack) -> None:
    keys = [key() for _ in range(60)]
    stop = threading.Event()

    def writer() -> None:
        with psycopg.connect(stack.dsn) as conn:
            for i in range(0, len(keys), 4):
                for k in keys[i : i + 4]:
                    enqueue_task(conn, RECORD_ONCE, [k], queue=stack.queue, table=stack.setup.table)
                conn.commit()
                time.sleep(0.02)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(stack.effects_of(k) for k in keys[:8]) and time.monotonic() < deadline:
        time.sleep(0.02)
    stack.relay.kill()  # mid-stream: some tasks published, some not, some unconfirmed
    stack.relay.start()
    thread.join(60)
    stack.wait_for(keys, timeout=120)
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        counts = dict(
            conn.execute(
                f"SELECT key, count(*) FROM {stack.effects} WHERE key = ANY(%s) GROUP BY key",
                (keys,),
            ).fetchall()
        )
    assert counts == dict.fromkeys(keys, 1)

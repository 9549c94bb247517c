"""The Celery app a real worker runs in the end-to-end tests (``celery -A tests.apps.celery_app``).

Tasks write their effect to a table, so a test can count how often each one
ran; ``record_once`` is guarded by the inbox, ``record`` is not.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from celery import Celery, current_task

from cdc_relay import inbox

DSN = os.environ.get("CDC_RELAY_TEST_WORKER_DSN", "")
EFFECTS = os.environ.get("CDC_RELAY_TEST_EFFECTS", "public.effects")
INBOX = os.environ.get("CDC_RELAY_TEST_INBOX", inbox.DEFAULT_TABLE)

app = Celery("cdc_relay_tests", broker=os.environ.get("CELERY_BROKER_URL", "memory://"))
app.conf.update(
    task_acks_late=True,  # a task is acked after it ran: at-least-once, like the relay
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("CDC_RELAY_TEST_QUEUE", "celery"),
)


def connect() -> psycopg.Connection[Any]:
    return psycopg.connect(DSN, autocommit=True)


def _effect(conn: psycopg.Connection[Any], key: str) -> None:
    task_id = current_task.request.id if current_task else None
    conn.execute(f"INSERT INTO {EFFECTS} (key, task_id) VALUES (%s, %s)", (key, task_id))


@app.task
def record(key: str) -> None:
    with connect() as conn:
        _effect(conn, key)


@app.task
@inbox.celery_once(connect, table=INBOX)
def record_once(conn: psycopg.Connection[Any], key: str) -> None:
    _effect(conn, key)


def _export_spans(path: str) -> None:
    """Tests read the worker's spans from a file (one JSON object per line)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
    provider = TracerProvider()
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    # What a user of Celery's instrumentation runs: it reads traceparent from the task headers.
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()


if os.environ.get("CDC_RELAY_TEST_SPANS"):
    _export_spans(os.environ["CDC_RELAY_TEST_SPANS"])

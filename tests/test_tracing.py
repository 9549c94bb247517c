"""Trace context from enqueue, through the relay, to the consumer's span."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psycopg
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from cdc_relay import inbox, outbox, tracing
from cdc_relay.outbox import enqueue, enqueue_task
from tests.apps.celery_stack import RECORD_ONCE, Stack, stack
from tests.harness import RelayProcess, Setup, unique_names

__all__ = ["stack"]  # the module-scoped fixture

EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)  # global, once per process: the helpers use it
tracer = trace.get_tracer("tests")


pytestmark = pytest.mark.integration  # its fixtures start their own servers


def traceparent(span: Any) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def headers_of(insert: outbox.Insert) -> dict[str, Any]:
    return dict(orjson.loads(insert.headers))


def test_enqueue_adds_the_current_trace_context() -> None:
    with tracer.start_as_current_span("POST /orders") as span:
        event = outbox.prepare_event("order", 1, "Created", {}, headers={"tenant": "acme"})
        task = outbox.prepare_task("app.tasks.mail")
    assert headers_of(event) == {"traceparent": traceparent(span), "tenant": "acme"}
    assert headers_of(task) == {"traceparent": traceparent(span)}


def test_tracestate_travels_too_and_explicit_headers_win() -> None:
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1")]),
    )
    with trace.use_span(NonRecordingSpan(context)):
        insert = outbox.prepare_event("order", 1, "Created", {})
        explicit = outbox.prepare_event("order", 1, "Created", {}, headers={"tracestate": "x=1"})
    assert headers_of(insert) == {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=v1",
    }
    assert headers_of(explicit)["tracestate"] == "x=1"


def test_no_span_no_headers() -> None:
    assert headers_of(outbox.prepare_event("order", 1, "Created", {})) == {}
    assert tracing.current_headers() == {}


def test_without_opentelemetry_nothing_changes() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from cdc_relay import outbox, tracing\n"
        "assert not tracing.available()\n"
        "assert tracing.current_headers() == {}\n"
        "with tracing.consumer_span('x', {'traceparent': 'y'}) as span: assert span is None\n"
        "print(outbox.prepare_event('order', 1, 'E', {}, headers={'a': 1}).headers)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == '{"a":1}'


def test_consumer_span_ignores_garbage_trace_headers() -> None:
    EXPORTER.clear()
    with tracing.consumer_span("q process", {"traceparent": "garbage", "tracestate": 5}):
        pass
    (span,) = EXPORTER.get_finished_spans()
    assert span.parent is None and span.kind == trace.SpanKind.CONSUMER


# -- end to end ------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def relayed(pg_dsn: str, amqp_url: str, tmp_path: Path) -> AsyncIterator[Setup]:
    setup = Setup(pg_dsn, amqp_url, unique_names("trace"))
    setup.init()
    relay = RelayProcess(setup, tmp_path / "relay.log").start()
    try:
        await relay.wait_for_log_async("streaming from slot")
        yield setup
    finally:
        relay.stop_quietly()
        setup.cleanup()


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_aio_pika_consumer_span_is_a_child_of_the_enqueuing_span(
    relayed: Setup, pg_dsn: str
) -> None:
    inbox_table = f"public.inbox_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(inbox.ddl(inbox_table))
    received: asyncio.Queue[str] = asyncio.Queue()

    async def handler(conn: Any, message: Any) -> None:
        received.put_nowait(message.message_id)

    connection = await aio_pika.connect(relayed.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(relayed.names["exchange"], "#")
        await queue.consume(
            inbox.aio_pika_handler(
                lambda: psycopg.AsyncConnection.connect(pg_dsn, autocommit=True),
                handler,
                table=inbox_table,
            )
        )
        EXPORTER.clear()
        with (
            tracer.start_as_current_span("POST /orders") as request_span,
            psycopg.connect(pg_dsn) as conn,
        ):
            message_id = enqueue(conn, "order", 1, "Created", {}, table=relayed.table)
            conn.commit()
        assert await asyncio.wait_for(received.get(), 60) == message_id
        await asyncio.sleep(0.2)
    finally:
        await connection.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {inbox_table}")
    consumers = [s for s in EXPORTER.get_finished_spans() if s.kind == trace.SpanKind.CONSUMER]
    assert len(consumers) == 1
    parent = request_span.get_span_context()
    assert consumers[0].parent is not None
    assert consumers[0].parent.span_id == parent.span_id
    assert consumers[0].context.trace_id == parent.trace_id


@pytest.mark.timeout(120)
def test_celery_task_span_is_a_child_of_the_enqueuing_span(stack: Stack) -> None:
    key = uuid.uuid4().hex[:12]
    with (
        tracer.start_as_current_span("POST /signup") as request_span,
        psycopg.connect(stack.dsn) as conn,
    ):
        enqueue_task(conn, RECORD_ONCE, [key], queue=stack.queue, table=stack.setup.table)
        conn.commit()
    stack.wait_for([key])
    parent = request_span.get_span_context()
    deadline = time.monotonic() + 10
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = stack.spans.read_text().splitlines() if stack.spans.exists() else []
        spans = [json.loads(line) for line in lines if line.strip()]
        if any(s["parent_id"] == f"0x{parent.span_id:016x}" for s in spans):
            break
        time.sleep(0.1)
    children = [s for s in spans if s["parent_id"] == f"0x{parent.span_id:016x}"]
    assert len(children) == 1, spans
    (run,) = children  # Celery's instrumentation picked the trace up from the task headers
    assert run["context"]["trace_id"] == f"0x{parent.trace_id:032x}"
    assert run["kind"] == "SpanKind.CONSUMER"
    assert run["name"] == f"run/{RECORD_ONCE}"
    # ... and the inbox decorator's span nests under it, in the same trace.
    (process,) = [s for s in spans if s["parent_id"] == run["context"]["span_id"]]
    assert process["name"] == f"{RECORD_ONCE} process"
    assert process["context"]["trace_id"] == run["context"]["trace_id"]


def test_consumer_span_nests_under_an_instrumentation_span_of_the_same_trace() -> None:
    with tracer.start_as_current_span("enqueue") as origin:
        carried = tracing.current_headers()
    EXPORTER.clear()
    # An instrumentation (Celery's) already started a span from the same headers ...
    with (
        tracer.start_as_current_span("run/task", context=_extracted(carried)) as run,
        tracing.consumer_span("task process", carried),
    ):
        pass
    # ... while the carried trace wins over a current span of another trace.
    with tracer.start_as_current_span("unrelated"), tracing.consumer_span("x process", carried):
        pass
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    assert spans["run/task"].parent.span_id == origin.get_span_context().span_id
    assert spans["task process"].parent.span_id == run.get_span_context().span_id
    assert spans["x process"].parent.span_id == origin.get_span_context().span_id
    assert spans["unrelated"].context.trace_id != origin.get_span_context().trace_id


def _extracted(headers: dict[str, str]) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)

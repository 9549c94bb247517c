"""W3C trace context across the outbox, when OpenTelemetry is installed.

``enqueue*`` writes the current ``traceparent``/``tracestate`` into the row's
headers; the relay copies row headers into AMQP headers (and Celery task
headers), so a consumer can continue the trace that committed the row. The
W3C propagator is used explicitly, not the global one: the relay only carries
the two W3C names, whatever else an app has configured (baggage, B3).

Without ``opentelemetry-api`` every function here is a no-op: the app side
must not need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")

try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _trace: Any = _otel_trace
    _PROPAGATOR: Any = TraceContextTextMapPropagator()
except ImportError:  # pragma: no cover - exercised by the test without OpenTelemetry
    _trace = None
    _PROPAGATOR = None


def available() -> bool:
    """True when OpenTelemetry's API is importable."""
    return _PROPAGATOR is not None


def current_headers() -> dict[str, str]:
    """``traceparent``/``tracestate`` of the current span; empty without a valid span."""
    if _PROPAGATOR is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return {name: carrier[name] for name in TRACE_HEADERS if name in carrier}


def with_trace_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The row's headers plus the current trace context; explicit headers win."""
    merged: dict[str, Any] = current_headers()
    if headers:
        merged.update(headers)
    return merged


@contextlib.contextmanager
def consumer_span(name: str, headers: Mapping[str, Any] | None) -> Iterator[Any]:
    """A CONSUMER span whose parent is the trace carried in ``headers`` (or no-op).

    When the current span already belongs to that trace (OpenTelemetry's
    Celery instrumentation starts one per task from the same headers), the
    span nests under it instead of becoming its sibling.
    """
    if _PROPAGATOR is None or _trace is None:
        yield None
        return
    carrier = {
        key: value
        for key in TRACE_HEADERS
        if isinstance(value := (headers or {}).get(key), str | bytes)
    }
    carrier = {k: v.decode() if isinstance(v, bytes) else v for k, v in carrier.items()}
    context: Any = _PROPAGATOR.extract(carrier)
    carried = _trace.get_current_span(context).get_span_context()
    current = _trace.get_current_span().get_span_context()
    if current.is_valid and current.trace_id == carried.trace_id:
        context = None  # an instrumentation (Celery's) already continues it: nest under that
    tracer = _trace.get_tracer("cdc_relay")
    with tracer.start_as_current_span(name, context=context, kind=_trace.SpanKind.CONSUMER) as span:
        yield span

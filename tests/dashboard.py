"""The shipped Grafana dashboard, read as the tests need it: panels, PromQL, metric names.

Shared by the static checks (tests/test_dashboard.py) and the check against a
real Prometheus (tests/test_observability_e2e.py), so both read the same
expressions the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "cdc-relay.json"

# The interface of issue 18: every metric the relay exports (counters with `_total`, the
# histogram as its `_bucket`/`_sum`/`_count`), and prometheus_client's process metrics.
RELAY_METRICS = frozenset(
    {
        "cdc_relay_slot_lag_bytes",
        "cdc_relay_slot_retained_wal_bytes",
        "cdc_relay_slot_safe_wal_size_bytes",
        "cdc_relay_slot_wal_status",
        "cdc_relay_slot_active",
        "cdc_relay_slot_poll_failures_total",
        "cdc_relay_dead_letters_pending",
        "cdc_relay_in_flight_messages",
        "cdc_relay_in_flight_bytes",
        "cdc_relay_amqp_blocked",
        "cdc_relay_role",
        "cdc_relay_last_confirm_timestamp_seconds",
        "cdc_relay_build_info",
        "cdc_relay_messages_published_total",
        "cdc_relay_messages_confirmed_total",
        "cdc_relay_publish_failures_total",
        "cdc_relay_messages_dead_lettered_total",
        "cdc_relay_transactions_total",
        "cdc_relay_reconnects_total",
        "cdc_relay_flush_lsn",
        "cdc_relay_received_lsn",
        "cdc_relay_ready",
        "cdc_relay_commit_to_confirm_seconds_bucket",
        "cdc_relay_commit_to_confirm_seconds_sum",
        "cdc_relay_commit_to_confirm_seconds_count",
    }
)
PROCESS_METRICS = frozenset({"process_resident_memory_bytes", "process_cpu_seconds_total"})

_METRIC = re.compile(r"\b((?:cdc_relay|process)_[a-z0-9_]+)\b")


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows only group them), nested ones included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found += [p for p in panel.get("panels", [])]
        if panel["type"] != "row":
            found.append(panel)
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def substitute(expr: str, slot: str, instances: list[str], rate_interval: str) -> str:
    """``expr`` as Grafana sends it with one slot and these instances selected.

    Names are taken as they are (slot names and host:port need no regex escape;
    a backslash would also need doubling inside a PromQL string).
    """
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$slot", slot)
        .replace("$instance", "|".join(instances))
    )

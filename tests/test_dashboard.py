"""Static checks of deploy/grafana/cdc-relay.json, the dashboard users import as it is.

Grafana is not installed here, so the structure Grafana 10+'s own export writes
is checked instead (schemaVersion, a datasource variable, gridPos, targets with
expr and refId, a templating list), and every expression parses as PromQL in
tests/test_observability_e2e.py against a real Prometheus.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.dashboard import (
    DASHBOARD,
    PROCESS_METRICS,
    RELAY_METRICS,
    expressions,
    load,
    metric_names,
    panels,
    substitute,
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load()


def test_current_schema_and_importable_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["id"] is None  # an export: Grafana assigns the id on import
    assert {r["id"] for r in dashboard["__requires"]} >= {"grafana", "prometheus"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_datasource_slot_and_instance_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("slot", "instance"):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"]
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert f", {name})" in var["query"]["query"], var["query"]
    assert "$slot" in variables["instance"]["query"]["query"]  # instances of the chosen slots


def test_every_panel_uses_the_datasource_variable_and_has_targets(
    dashboard: dict[str, Any],
) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"]


def test_every_panel_says_what_a_bad_value_means_and_what_to_do(
    dashboard: dict[str, Any],
) -> None:
    for panel in panels(dashboard):
        text = panel.get("description", "")
        # Two sentences at least: what the number is and what a bad one means / what to do.
        clauses = sum(text.count(sep) for sep in (". ", ": ", "; "))
        assert len(text) >= 120 and clauses >= 2, panel["title"]


def test_every_metric_named_is_one_the_relay_exports(dashboard: dict[str, Any]) -> None:
    named: set[str] = set()
    for title, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, (title, expr)
        unknown = names - RELAY_METRICS - PROCESS_METRICS
        assert not unknown, f"{title}: {sorted(unknown)} not in the metric list"
        named |= names
        for name in names:
            # Every relay series carries `slot`: the panel follows the slot variable.
            if name.startswith("cdc_relay_"):
                assert re.search(name + r'\{[^}]*slot=~"\$slot"', expr), (title, expr)
    # The panels the issue asks for are all there.
    for wanted in (
        "cdc_relay_messages_published_total",
        "cdc_relay_messages_confirmed_total",
        "cdc_relay_commit_to_confirm_seconds_bucket",
        "cdc_relay_slot_lag_bytes",
        "cdc_relay_slot_retained_wal_bytes",
        "cdc_relay_slot_safe_wal_size_bytes",
        "cdc_relay_slot_wal_status",
        "cdc_relay_messages_dead_lettered_total",
        "cdc_relay_dead_letters_pending",
        "cdc_relay_in_flight_messages",
        "cdc_relay_in_flight_bytes",
        "cdc_relay_publish_failures_total",
        "cdc_relay_reconnects_total",
        "cdc_relay_role",
        "cdc_relay_amqp_blocked",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert wanted in named, wanted


def test_substitution_leaves_no_variable(dashboard: dict[str, Any]) -> None:
    for _, expr in expressions(dashboard):
        done = substitute(expr, "s1", ["127.0.0.1:1", "127.0.0.1:2"], "1m")
        assert "$" not in done, done


def test_every_metric_named_is_in_the_documented_metric_list(dashboard: dict[str, Any]) -> None:
    """docs/operations.md's table is the list operators read: the dashboard names nothing else."""
    docs = (DASHBOARD.parent.parent.parent / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `((?:cdc_relay|process)_[a-z0-9_]+)`", docs, re.M))
    for _, expr in expressions(dashboard):
        for name in metric_names(expr):
            if name.startswith("process_"):
                assert "process_*" in docs
                continue
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in documented or base in documented, name

"""The shipped alert rules: promtool checks them, its unit tests fire and silence each alert,
and the PrometheusRule in deploy/kubernetes.yaml carries exactly the same rules.

promtool (Debian's ``prometheus`` package, installed by scripts/ensure-servers.sh)
evaluates the rules with Prometheus' own engine over synthetic series
(deploy/prometheus/cdc-relay-rules.test.yml); no server is started.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from devtools import prometheus

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "cdc-relay-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "cdc-relay-rules.test.yml"
KUBERNETES = DEPLOY / "kubernetes.yaml"
DOCS = Path(__file__).resolve().parent.parent / "docs"

# The alerts issue 18 asks for (more may follow).
REQUIRED_ALERTS = {
    "NoActiveRelay",
    "SlotLagHigh",
    "SlotWalAtRisk",
    "DeadLettersPending",
    "CommitToConfirmSlow",
    "PublishFailing",
    "BrokerBlocked",
    "RelayDown",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus.PROMTOOL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_fire_and_silence_every_alert() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert fired == names, f"never shown firing: {names - fired}"
    assert silent == names, f"never shown silent: {names - silent}"


def test_promtool_fails_a_broken_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: the same file expecting NoActiveRelay too early does."""
    (tmp_path / RULES.name).write_text(RULES.read_text())
    broken = RULE_TESTS.read_text().replace("eval_time: 10m", "eval_time: 5m", 1)
    assert broken != RULE_TESTS.read_text()
    (tmp_path / RULE_TESTS.name).write_text(broken)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and "NoActiveRelay" in result.stdout + result.stderr


def test_promtool_check_config_of_the_test_prometheus(tmp_path: Path) -> None:
    """The configuration the private Prometheus is started with (tests' launcher) is valid."""
    server = prometheus.PrometheusServer(["127.0.0.1:9"], rule_files=[RULES], base_dir=tmp_path)
    server._prepare()
    result = promtool("check", "config", str(server.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_required_alerts_with_summary_runbook_and_severity() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(by_name) >= REQUIRED_ALERTS
    for name, rule in by_name.items():
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        doc, _, anchor = annotations["runbook_url"].partition("#")
        assert doc in ("docs/operations.md", "docs/recovery.md"), name
        headings = re.findall(r"^#+ (.+)$", (DOCS.parent / doc).read_text(), re.M)
        anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
        assert anchor in anchors, f"{name}: no heading for #{anchor} in {doc}"


def test_prometheus_rule_in_kubernetes_carries_the_same_alerts() -> None:
    documents = list(yaml.safe_load_all(KUBERNETES.read_text()))
    (rule,) = [d for d in documents if d and d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_kubernetes_has_what_a_rollout_needs() -> None:
    documents = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d}
    assert {"Deployment", "PodDisruptionBudget", "ServiceMonitor", "Job"} <= set(documents)
    deployment = documents["Deployment"]["spec"]
    assert deployment["replicas"] == 2
    # Rolling one pod at a time: with a standby Ready this completes.
    assert deployment["strategy"]["type"] == "RollingUpdate"
    assert deployment["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    (container,) = deployment["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert documents["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    (endpoint,) = documents["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    (init,) = documents["Job"]["spec"]["template"]["spec"]["containers"]
    assert init["args"][0] == "init"

"""The private Prometheus launcher (devtools/prometheus.py): loopback only, our targets
and rules, nothing left behind, not even when the Python process that started it is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from devtools.procs import listen_addresses, pid_alive
from devtools.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "cdc-relay-rules.yml"


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_prometheus_scrapes_its_targets_with_our_rules_and_leaves_nothing_behind() -> None:
    with PrometheusServer(rule_files=[RULES], lifecycle=True) as prom:
        base_dir = prom.base_dir
        assert prom._proc is not None
        pid = prom._proc.pid
        assert listen_addresses(prom.port) == {"127.0.0.1"}
        assert [g["name"] for g in prom.rule_groups()] == ["cdc-relay"]
        # Targets learnt after start (file_sd): Prometheus scrapes itself here.
        prom.set_targets([f"127.0.0.1:{prom.port}"])
        wait_for(lambda: prom.query('up{job="cdc-relay"} == 1'), 30, "the target to be up")
        prom.reload()
        with pytest.raises(RuntimeError, match="parse error"):
            prom.query("sum(")
    assert not pid_alive(pid)
    assert not base_dir.exists()


def test_prometheus_does_not_outlive_a_killed_python_process() -> None:
    """SIGKILL skips atexit: the guardian must still kill Prometheus and remove its dir."""
    script = textwrap.dedent(
        """
        import os, signal
        from devtools.prometheus import PrometheusServer
        server = PrometheusServer()
        server.start()
        print(server.base_dir, server._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == -9, result.stderr
    base_dir, pid = result.stdout.split()
    wait_for(lambda: not pid_alive(int(pid)), 15, "the orphaned Prometheus to die")
    wait_for(lambda: not Path(base_dir).exists(), 15, "the temp dir to be removed")

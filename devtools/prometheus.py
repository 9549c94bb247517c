"""A private Prometheus server: own directory, free loopback port, our scrape targets and rules.

The tests prove the shipped rule file and dashboard against a real Prometheus
(Debian's ``prometheus`` package), not against a reimplementation of PromQL.
Targets are a ``file_sd`` file in the server's directory, so a test can point
it at relays whose ports it learns later (``set_targets``: Prometheus watches
the file and picks the change up within a second). The HTTP API helpers
(``query``, ``alerts``, ``targets``) use the standard library: a test asks a
loopback port, nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from devtools.procs import (
    LOOPBACK,
    Server,
    check_servers_allowed,
    cmdline,
    free_port,
    kill_tree,
    pid_alive,
    tail,
    wait_until,
)

__all__ = ["PROMETHEUS", "PROMTOOL", "PrometheusServer", "kill_prometheus"]

PROMETHEUS = os.environ.get("CDC_RELAY_PROMETHEUS", "/usr/bin/prometheus")
PROMTOOL = os.environ.get("CDC_RELAY_PROMTOOL", "/usr/bin/promtool")
JOB = "cdc-relay"


def _tsdb_flag(base_dir: Path) -> bytes:
    return b"--storage.tsdb.path=" + os.fsencode(str(base_dir / "data"))


def kill_prometheus(base_dir: Path) -> list[int]:
    """SIGKILL the Prometheus whose data lives in ``base_dir``; return survivors.

    Found by its ``--storage.tsdb.path`` argument, unique to this server (the
    guardian has no Popen object, only the directory).
    """
    marker = _tsdb_flag(base_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = cmdline(int(entry.name))
            if args and marker in args.split(b"\0"):
                pids.append(int(entry.name))
    pids = [pid for pid in pids if pid_alive(pid)]
    return kill_tree(pids) if pids else []


class PrometheusServer(Server):
    """Prometheus on 127.0.0.1:``port`` scraping ``targets`` (host:port) every ``scrape_interval``.

    ``rule_files`` are copied into the server's directory (``rules/``) and
    evaluated every ``evaluation_interval``. ``lifecycle`` adds
    ``--web.enable-lifecycle`` (``reload()``, a POST to ``/-/reload``).
    """

    KIND = "prom"
    PREFIX = "cdc-relay-prom-"

    def __init__(
        self,
        targets: Iterable[str] = (),
        *,
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        lifecycle: bool = False,
        base_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self._init_dir(base_dir)
        self.port: int = port or free_port()
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.lifecycle = lifecycle
        self.rule_files = list(rule_files)
        self.initial_targets = list(targets)
        self.config_path = self.base_dir / "prometheus.yml"
        self.targets_path = self.base_dir / "targets.json"
        self.log_path = self.base_dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"PrometheusServer(port={self.port})"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # -- configuration ----------------------------------------------------------------

    def config_text(self) -> str:
        """prometheus.yml (JSON is YAML): our job, file_sd targets, the copied rule files."""
        rules_dir = self.base_dir / "rules"
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(rules_dir / path.name) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "file_sd_configs": [
                        {"files": [str(self.targets_path)], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        return json.dumps(config, indent=2) + "\n"

    def _prepare(self) -> None:
        (self.base_dir / "data").mkdir(exist_ok=True)
        rules_dir = self.base_dir / "rules"
        rules_dir.mkdir(exist_ok=True)
        for path in self.rule_files:
            shutil.copyfile(path, rules_dir / path.name)
        self.config_path.write_text(self.config_text())
        if not self.targets_path.exists():
            self.set_targets(self.initial_targets)

    def set_targets(self, targets: Iterable[str]) -> None:
        """Scrape these host:port targets from now on (written atomically: file_sd
        could otherwise read a half-written file and drop every target)."""
        tmp = self.targets_path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": list(targets), "labels": {}}]) + "\n")
        tmp.replace(self.targets_path)

    def args(self) -> list[str]:
        args = [
            PROMETHEUS,
            f"--config.file={self.config_path}",
            _tsdb_flag(self.base_dir).decode(),
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=info",
        ]
        if self.lifecycle:
            args.append("--web.enable-lifecycle")
        return args

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start and wait until /-/ready answers 200 (rules loaded, TSDB open)."""
        check_servers_allowed("Prometheus")
        if self.is_running():
            return
        if not os.access(PROMETHEUS, os.X_OK):
            raise RuntimeError(
                f"{PROMETHEUS} not found: install Debian's `prometheus` package "
                "(scripts/ensure-servers.sh does) or set CDC_RELAY_PROMETHEUS"
            )
        self._prepare()
        self._track()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.args(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.base_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        proc = self._proc
        if not wait_until(lambda: proc.poll() is not None or self._ready(), deadline, 0.1):
            self.kill()
            raise RuntimeError(f"Prometheus not ready after {timeout}s\n{tail(self.log_path, 30)}")
        if proc.poll() is not None:
            raise RuntimeError(
                f"Prometheus exited with {proc.returncode} at start\n{tail(self.log_path, 30)}"
            )

    def _ready(self) -> bool:
        return self._http("GET", "/-/ready", timeout=1)[0] == 200

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        kill_prometheus(self.base_dir)

    def _stop_cleanly(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)

    def reload(self) -> None:
        """Re-read the configuration and rule files (needs ``lifecycle``)."""
        self._prepare()
        status, body = self._http("POST", "/-/reload", timeout=10)
        if status != 200:
            raise RuntimeError(f"reload answered {status}: {body}")

    def log_tail(self, n: int = 30) -> str:
        return tail(self.log_path, n)

    # -- HTTP API ---------------------------------------------------------------------

    def _http(self, method: str, path: str, timeout: float = 10) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a /api/v1 answer; an error answer raises with Prometheus' message."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = self._http("GET", f"/api/v1/{path}{query}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise RuntimeError(f"/api/v1/{path} answered {status}: {body[:500]!r}") from None
        if answer.get("status") != "success":
            raise RuntimeError(f"/api/v1/{path} {params}: {answer.get('error', answer)}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or a scalar as one element) ``expr`` evaluates to now."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing) with their labels and state."""
        return list(self.api("alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health (``up``/``down``/``unknown``)."""
        return list(self.api("targets")["activeTargets"])

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups (to check a rule file was loaded at all)."""
        return list(self.api("rules")["groups"])

"""``cdc-relay run`` as a real OS process, for tests, the benchmark and the demo.

A child process (``python -m cdc_relay.cli run``) so that tests can SIGTERM or
SIGKILL it exactly as an orchestrator would, and the benchmark can read its
CPU time and memory from /proc.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from cdc_relay.config import Settings
from devtools import metrics

__all__ = ["RelayProcess", "cli_args"]


class HasSettings(Protocol):
    """Anything that carries relay settings (the tests' ``Setup``)."""

    @property
    def settings(self) -> Settings: ...


def cli_args(settings: Settings) -> list[str]:
    """The connection and naming options of ``settings`` as ``cdc-relay`` arguments."""
    args = ["--dsn", settings.dsn]
    for url in settings.amqp_urls:
        args += ["--amqp-url", url]
    return [
        *args,
        "--slot",
        settings.slot,
        "--publication",
        settings.publication,
        "--table",
        settings.table,
        "--exchange",
        settings.exchange,
    ]


class RelayProcess:
    """``cdc-relay run`` as a child process with its log in a file.

    ``extra`` options go last, so they override the defaults given here. With
    ``metrics_port`` the relay serves /metrics and /readyz there.
    """

    def __init__(
        self,
        target: Settings | HasSettings,
        log_path: Path,
        *extra: str,
        log_level: str = "DEBUG",
        stats_interval: float | None = 2,
        metrics_port: int | None = None,
    ) -> None:
        self.settings: Settings = target if isinstance(target, Settings) else target.settings
        self.log_path = log_path
        self.extra = list(extra)
        self.log_level = log_level
        self.stats_interval = stats_interval
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self.ready_at = 0.0

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "cdc_relay.cli", "run", *cli_args(self.settings)]
        if self.stats_interval is not None:
            args += ["--stats-interval", f"{self.stats_interval:g}"]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        return [*args, "--log-level", self.log_level, *self.extra]

    def start(self) -> RelayProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.spawned = time.monotonic()
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- the log --------------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 2000) -> str:
        return self.log()[-n:].strip() or "(empty log)"

    def check_alive(self) -> None:
        """Raise with the log when the relay has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.log_tail()}")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"relay exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in relay log after {timeout}s:\n{self.log()[-4000:]}")

    async def wait_for_log_async(self, text: str, timeout: float = 30) -> None:
        """wait_for_log without blocking the event loop (proxies, consumers)."""
        await asyncio.to_thread(self.wait_for_log, text, timeout)

    def cleanup_log(self) -> None:
        """Remove an empty log (nothing at WARNING and above was said)."""
        if self.log_path.exists() and self.log_path.stat().st_size == 0:
            self.log_path.unlink()

    # -- readiness ------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 60) -> float:
        """Poll until the relay streams (/readyz 200 as the active relay; a standby is ready
        too); returns the seconds since spawning."""
        assert self.metrics_port is not None, "wait_ready needs a metrics_port"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if (
                await asyncio.to_thread(metrics.readyz, self.metrics_port) == 200
                and await asyncio.to_thread(metrics.role, self.metrics_port) == "active"
            ):
                self.ready_at = time.monotonic()
                return self.ready_at - self.spawned
            await asyncio.sleep(0.01)
        raise RuntimeError(f"relay not ready after {timeout}s: {self.log_tail()}")

    async def histogram(self, name: str) -> dict[float, float]:
        """Cumulative bucket counts (upper bound in seconds -> count) of one histogram."""
        assert self.metrics_port is not None, "histogram needs a metrics_port"
        return await metrics.histogram(self.metrics_port, name)

    # -- stopping -------------------------------------------------------------------

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the clean drain. Returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                self.terminate(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

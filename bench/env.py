"""The machine, CPU accounting from /proc, the progress display and small statistics."""

from __future__ import annotations

import glob
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
_T0 = time.monotonic()


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, kernel and Python version."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def erlang_otp() -> str:
    """The installed Erlang/OTP release, read from its release files."""
    for path in sorted(glob.glob("/usr/lib/erlang/releases/*/OTP_VERSION")):
        return Path(path).read_text().strip()
    return "?"


def git_revision() -> str:
    """The commit the bench ran from, with "+changes" if the work tree differed from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (commit or "?") + ("+changes" if dirty else "")


# -- CPU accounting ------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included, children not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _machine_busy_ticks() -> int:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks of the process and of its reaped children)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        table[int(entry)] = (int(fields[1]), ticks)
    return table


class CpuMeter:
    """Splits the machine's CPU time into named process trees and "other".

    ``roots()`` names the root pid of each group (the bench itself, Postgres,
    RabbitMQ, the relay); a process belongs to the group of its nearest
    ancestor that is a root. "other" is whatever else ran on the machine: on a
    shared host that is the noise to read every number against.
    """

    def __init__(self, roots: Callable[[], dict[str, int | None]]) -> None:
        self.roots = roots

    def snapshot(self) -> dict[str, float]:
        roots = {pid: name for name, pid in self.roots().items() if pid}
        busy = _machine_busy_ticks()
        table = _process_table()
        ticks: dict[str, int] = dict.fromkeys(roots.values(), 0)
        for pid, (ppid, own) in table.items():
            node, parent = pid, ppid
            for _ in range(64):
                if node in roots:
                    ticks[roots[node]] += own
                    break
                if parent <= 1:
                    break
                node, parent = parent, table.get(parent, (0, 0))[0]
        snap = {name: t / CLK_TCK for name, t in ticks.items()}
        snap["machine"] = busy / CLK_TCK
        snap["wall"] = time.monotonic()
        return snap

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Average cores used per group between two snapshots, plus "other"."""
        wall = max(after["wall"] - before["wall"], 1e-9)
        out: dict[str, float] = {}
        ours = 0.0
        for name, value in after.items():
            if name in ("wall", "machine"):
                continue
            used = max(value - before.get(name, 0.0), 0.0)
            ours += used
            out[name] = round(used / wall, 2)
        out["other"] = round(max(after["machine"] - before["machine"] - ours, 0.0) / wall, 2)
        return out


# -- progress -------------------------------------------------------------------------


def log(text: str) -> None:
    """One progress line on stderr, stamped with the time since the bench started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


class Phase:
    """A measured step: a line when it starts, throttled progress lines, a line at the end.

    It also measures where the CPU went while it ran (``self.cpu``).
    """

    meter: CpuMeter | None = None

    def __init__(self, title: str, measure: bool = True) -> None:
        self.title = title
        self.measure = measure
        self.cpu: dict[str, float] = {}
        self.summary = ""
        self._last_note = 0.0

    def __enter__(self) -> Phase:
        self.started = time.monotonic()
        self._before = self.meter.snapshot() if self.meter and self.measure else None
        log(f"{self.title} ...")
        return self

    def note(self, text: str, every: float = 3.0) -> None:
        """A progress line, at most one per ``every`` seconds."""
        now = time.monotonic()
        if now - self._last_note >= every:
            self._last_note = now
            log(f"  {self.title}: {text} ({now - self.started:.1f}s)")

    def restart_cpu(self) -> None:
        """Measure CPU from now on: setup such as starting servers is not the measurement."""
        if self.meter and self.measure:
            self._before = self.meter.snapshot()

    def measure_cpu(self) -> dict[str, float]:
        """CPU use since the phase started (call before stopping its processes)."""
        if self.meter and self._before:
            self.cpu = CpuMeter.cores(self._before, self.meter.snapshot())
        return self.cpu

    def __exit__(self, exc_type: object, *exc: object) -> None:
        took = time.monotonic() - self.started
        if not self.cpu:
            self.measure_cpu()
        load = ", ".join(f"{k} {v:.2f}" for k, v in self.cpu.items())
        status = "failed" if exc_type else "done"
        extra = f"; {self.summary}" if self.summary else ""
        extra += f"; cores used: {load}" if load else ""
        log(f"  {status} in {took:.1f}s{extra}")


def percentiles(values: list[float]) -> dict[str, float]:
    """n, p50, p95, p99 and max of seconds, reported in milliseconds."""
    if len(values) < 2:
        nan = float("nan")
        return {"n": len(values), "p50_ms": nan, "p95_ms": nan, "p99_ms": nan, "max_ms": nan}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "p50_ms": q[49] * 1e3,
        "p95_ms": q[94] * 1e3,
        "p99_ms": q[98] * 1e3,
        "max_ms": max(values) * 1e3,
    }


CDF_SHARES = [i / 100 for i in range(1, 100)] + [0.995, 0.999, 1.0]


def cdf_points(values: list[float]) -> list[list[float]]:
    """[milliseconds, share of values at or under it] at fixed shares, for the latency plots."""
    if not values:
        return []
    ordered = sorted(values)
    last = len(ordered) - 1
    return [[ordered[round(share * last)] * 1e3, share] for share in CDF_SHARES]

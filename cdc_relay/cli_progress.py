"""Progress of long commands (``prune``, ``resync``, ``dead-letters replay``) as text.

Pure: counts and clock readings in, lines out (``Meter`` hands its lines to the
callables it is given). On a terminal the command rewrites one line with the
count, the rate and the time left; elsewhere (a log, a pipe) the same line is a
DEBUG log record (shown with ``--log-level debug``, one JSON object each with
``--log-format json``) and the summary is written once, so a log is not flooded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole // 60 % 60:02d}m"


@dataclass(frozen=True, slots=True)
class Progress:
    """What is being counted (``deleted``, ``row(s)``), since when, out of how many if known."""

    verb: str
    unit: str
    started: float
    total: int | None = None

    def rate(self, done: int, now: float) -> float:
        elapsed = now - self.started
        return done / elapsed if elapsed > 0 else 0.0

    def line(self, done: int, now: float) -> str:
        """The terminal line: count (of total), rate, time left when the total is known."""
        rate = self.rate(done, now)
        count = f"{done:,}" if self.total is None else f"{done:,}/{self.total:,}"
        text = f"{self.verb} {count} {self.unit}, {rate:,.0f}/s"
        if self.total is not None and rate > 0 and done < self.total:
            text += f", {_duration((self.total - done) / rate)} left"
        return text

    def summary(self, done: int, now: float) -> str:
        """The one line written at the end, terminal or not."""
        elapsed = max(now - self.started, 0.0)
        return (
            f"{self.verb} {done:,} {self.unit} in {_duration(elapsed)} "
            f"({self.rate(done, now):,.0f}/s)"
        )

    def fields(self, done: int, now: float) -> dict[str, float | int | None]:
        """The summary's numbers, for a JSON log line."""
        return {
            "done": done,
            "total": self.total,
            "seconds": round(max(now - self.started, 0.0), 3),
            "rate": round(self.rate(done, now), 1),
        }


@dataclass(slots=True)
class Meter:
    """A ``Progress`` shown while the work runs: ``show`` on a terminal, ``note`` elsewhere."""

    progress: Progress
    on_terminal: bool
    show: Callable[[str], None]  # rewrite the terminal's progress line
    note: Callable[[str], None]  # one DEBUG log line
    done: int = field(default=0)

    def update(self, done: int, now: float, detail: str = "") -> None:
        self.done = done
        text = self.progress.line(done, now) + detail
        (self.show if self.on_terminal else self.note)(text)

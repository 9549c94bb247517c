"""How many dead letters get a log line of their own: a budget per window, then one summary.

Pure: no clock, no logging. The dead-letter table holds every letter with its
reason; the log line per letter is the operator's hint. A misconfigured binding
dead-letters every row, and a WARNING line per row cost about a third of the
relay's CPU on that path (measured with ``devtools.profile_drain``) and floods
the log with identical lines. So the first ``per_window`` letters of each
window are logged one by one, the rest are counted by reason, and one summary
line says how many were not logged and where to find them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DEFAULT_PER_WINDOW = 100
DEFAULT_WINDOW_SECONDS = 10.0


@dataclass(slots=True)
class LogBudget:
    """Decides, letter by letter, whether it gets its own line; collects what did not."""

    per_window: int = DEFAULT_PER_WINDOW
    window: float = DEFAULT_WINDOW_SECONDS
    _started: float | None = None
    _logged: int = 0
    _skipped: Counter[str] = field(default_factory=Counter)

    def take(self, now: float) -> bool:
        """True: log this letter on its own line. False: ``skip`` it (counted for the summary).

        A window that ended with letters unlogged starts again only in ``summary``,
        so the summary line always comes before the next window's lines.
        """
        started = self._started
        if started is None or (now - started >= self.window and not self._skipped):
            self._started, self._logged = now, 0
        if self._logged < self.per_window:
            self._logged += 1
            return True
        return False

    def skip(self, reason: str) -> None:
        """Count one letter that ``take`` said not to log, by its reason code."""
        self._skipped[reason] += 1

    def due(self, now: float) -> float | None:
        """Seconds until ``summary`` has a line to give (0: now), or None: nothing unlogged."""
        if not self._skipped or self._started is None:
            return None
        return max(0.0, self._started + self.window - now)

    def summary(self, now: float) -> tuple[int, dict[str, int], float] | None:
        """At a window's end with letters left unlogged: (count, by reason, seconds), once.

        The window then starts again, so the next letters get lines of their own.
        """
        started = self._started
        if not self._skipped or started is None or now - started < self.window:
            return None
        return self.flush(now)

    def flush(self, now: float) -> tuple[int, dict[str, int], float] | None:
        """The summary now, window over or not (the session ends): None if nothing is unlogged."""
        started = self._started
        if not self._skipped or started is None:
            return None
        skipped = dict(self._skipped)
        self._skipped.clear()
        self._started, self._logged = now, 0
        return sum(skipped.values()), skipped, now - started

"""How long to wait before the next session: a pure function of the last one's end.

Exponential backoff with full jitter, reset by a healthy session. A session
that ended on a broker refusal (a nack) is the exception: the broker answered
at once, so it is up, and what it refused (a quorum queue without a majority,
a full bounded queue) heals when the cluster does, not on our schedule.
Measured before this cap (docs/ha.md): with two of three quorum members down
the nacks came at once, the backoff grew to 23.6 s, and delivery resumed 16 s
after the majority was back. Capped, it resumes within ``REFUSED_BACKOFF_MAX``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

# Longest pause after a session that ended on a nack: the broker is answering,
# so retrying every 1-2 s costs one short session each time and nothing more.
REFUSED_BACKOFF_MAX: Final = 2.0


def reconnect_delay(
    attempt: int,
    reconnect_min: float,
    reconnect_max: float,
    *,
    refused: bool = False,
    uniform: Callable[[float, float], float],
) -> float:
    """Seconds before session ``attempt`` (0 after a healthy one), never below the minimum.

    ``refused``: the session ended on a broker refusal, so the ceiling is at most
    ``REFUSED_BACKOFF_MAX`` whatever the attempt. ``uniform`` is ``random.uniform``
    (passed in so tests choose the draw).
    """
    ceiling = min(reconnect_max, reconnect_min * (2 ** min(attempt, 30)))
    if refused:
        ceiling = min(ceiling, max(reconnect_min, REFUSED_BACKOFF_MAX))
    return max(reconnect_min, uniform(0, ceiling))

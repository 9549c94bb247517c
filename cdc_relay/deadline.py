"""Waiting with a deadline without losing a cancellation.

Python 3.11's ``asyncio.wait_for`` swallows a cancellation that arrives while
the awaited thing completes (CPython gh-86296, fixed in 3.12). A loop such as
"wait for the wakeup event or the interval" then runs on after its task was
cancelled. Measured here: at the end of a session the status loop ignored its
cancel that way and held the reconnect for the full 10 s cleanup bound.
``asyncio.timeout`` has no such race, so every timed wait goes through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``awaitable``'s result, or TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def event_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds`` (False on timeout, never an error)."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True

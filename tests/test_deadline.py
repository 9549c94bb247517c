"""Timed waits that never swallow a cancellation (Python 3.11's wait_for can)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cdc_relay.deadline import event_within, within


@pytest.mark.asyncio
async def test_event_within_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await event_within(event, 0.01) is False
    event.set()
    assert await event_within(event, 0.01) is True


@pytest.mark.asyncio
async def test_within_returns_the_result_or_times_out() -> None:
    assert await within(asyncio.sleep(0, result=7), 1) == 7
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(1), 0.01)


async def loop_until_cancelled(wait: Callable[[asyncio.Event], Awaitable[object]]) -> int:
    """The status loop's shape: wait for a wakeup or the interval, again and again."""
    wakeup = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait(wakeup)
            wakeup.clear()
            rounds += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    wakeup.set()  # the wakeup and the cancel land in the same turn of the event loop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), 2)
    return rounds


@pytest.mark.asyncio
async def test_a_wakeup_and_a_cancel_together_still_cancel() -> None:
    for _ in range(20):
        assert await loop_until_cancelled(lambda e: event_within(e, 10)) == 0


def test_the_package_never_uses_wait_for() -> None:
    """Every timed wait in the relay goes through cdc_relay.deadline."""
    package = Path(__file__).resolve().parent.parent / "cdc_relay"
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "wait_for(" in path.read_text()
    ]
    assert offenders == []

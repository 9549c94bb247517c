"""Drive libpq protocol generators on the asyncio event loop: the one place that waits.

The protocol steps (``replication.py``) are generators in psycopg's style
(``psycopg/generators.py``): they call libpq's nonblocking functions and, when
libpq would block, yield what they wait for (``Wait.R``, ``Wait.W``,
``Wait.RW``); the driver sends back what became ready (``Ready``). So the
protocol logic runs without a socket in unit tests, and this module is the
only code that touches the event loop.

Why not psycopg's own ``waiting.wait_async``: it is not documented API, and it
re-arms a timer every ``interval`` seconds of each wait. A replication stream
waits for data indefinitely between keepalives; here the socket alone wakes us,
and timeouts belong to the caller (``asyncio.timeout`` cancels a wait cleanly:
the fd callbacks are removed and the generator is closed).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Generator
from typing import TypeAlias, TypeVar

RV = TypeVar("RV")


class Wait(enum.IntFlag):
    """What a generator waits for on the connection's socket."""

    R = 1
    W = 2
    RW = 3


class Ready(enum.IntFlag):
    """What the socket was found ready for, sent back into the generator."""

    NONE = 0
    R = 1
    W = 2
    RW = 3


PQGen: TypeAlias = Generator[Wait, Ready, RV]
"""A protocol step: yields waits, receives readiness, returns its result."""


async def wait_async(gen: PQGen[RV], fileno: int) -> RV:
    """Run ``gen`` to completion, waiting on ``fileno`` whenever it asks; return its value.

    A generator that does not need to wait completes without suspending the task.
    """
    try:
        state = next(gen)
        loop = asyncio.get_running_loop()
        while True:
            ready = await _wait_fd(loop, fileno, state)
            state = gen.send(ready)
    except StopIteration as done:
        result: RV = done.value
        return result
    finally:
        gen.close()  # cancelled or failed mid-wait: run the generator's cleanup now


async def _wait_fd(loop: asyncio.AbstractEventLoop, fileno: int, state: Wait) -> Ready:
    """Wait once for ``state`` on ``fileno``; a future resolved by the fd callbacks."""
    if not state & Wait.RW:
        raise ValueError(f"bad wait state: {state!r}")
    future: asyncio.Future[None] = loop.create_future()
    ready = Ready.NONE

    def wake(what: Ready) -> None:
        nonlocal ready
        ready |= what
        if not future.done():
            future.set_result(None)

    if state & Wait.R:
        loop.add_reader(fileno, wake, Ready.R)
    try:
        if state & Wait.W:
            loop.add_writer(fileno, wake, Ready.W)
        try:
            await future
        finally:
            if state & Wait.W:
                loop.remove_writer(fileno)
    finally:
        if state & Wait.R:
            loop.remove_reader(fileno)
    return ready

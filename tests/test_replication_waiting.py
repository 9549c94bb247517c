"""The async waiter that drives protocol generators, on a socketpair instead of a server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from cdc_relay.pg.waiting import PQGen, Ready, Wait, wait_async

pytestmark = pytest.mark.asyncio


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def read_once(sock: socket.socket, log: list[object]) -> PQGen[bytes]:
    """Wait for read, then read: the shape of every replication step."""
    try:
        ready = yield Wait.R
        log.append(ready)
        return sock.recv(100)
    finally:
        log.append("closed")


async def test_a_step_that_need_not_wait_does_not_suspend() -> None:
    def immediate() -> PQGen[int]:
        return 42
        yield Wait.R  # a generator that returns before its first yield

    task = asyncio.ensure_future(wait_async(immediate(), -1))
    # Run the task's first step only: it must already be done.
    await asyncio.sleep(0)
    assert task.done() and task.result() == 42


async def test_waits_for_read_and_sends_ready(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    loop = asyncio.get_running_loop()
    log: list[object] = []
    loop.call_later(0.05, theirs.send, b"data")
    assert await wait_async(read_once(ours, log), ours.fileno()) == b"data"
    assert log == [Ready.R, "closed"]
    assert not loop.remove_reader(ours.fileno())  # nothing left registered


async def test_waits_for_write(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair

    def write_step() -> PQGen[Ready]:
        ready = yield Wait.W
        return ready

    assert await wait_async(write_step(), ours.fileno()) == Ready.W
    assert not asyncio.get_running_loop().remove_writer(ours.fileno())


async def test_read_or_write_reports_what_was_ready(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.send(b"x")
    await asyncio.sleep(0.01)

    def either() -> PQGen[Ready]:
        return (yield Wait.RW)

    # Both are ready at once: one loop iteration runs both callbacks.
    assert await wait_async(either(), ours.fileno()) == Ready.RW


async def test_cancelled_wait_unregisters_and_closes_the_generator(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    log: list[object] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await wait_async(read_once(ours, log), ours.fileno())
    assert log == ["closed"]  # never resumed, but its cleanup ran
    assert not asyncio.get_running_loop().remove_reader(ours.fileno())


async def test_an_error_in_the_step_propagates(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.send(b"x")

    def failing() -> PQGen[None]:
        yield Wait.R
        raise RuntimeError("protocol violated")

    with pytest.raises(RuntimeError, match="protocol violated"):
        await wait_async(failing(), ours.fileno())
    assert not asyncio.get_running_loop().remove_reader(ours.fileno())


async def test_bad_wait_state_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair

    def bad() -> PQGen[None]:
        yield Wait(0)

    with pytest.raises(ValueError, match="bad wait state"):
        await wait_async(bad(), ours.fileno())

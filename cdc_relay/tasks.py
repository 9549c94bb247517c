"""The tasks of one session, owned together and ended one way (like a trio nursery).

A session runs several tasks (the pump, status updates, the dead-letter
worker, the state writer, ...). Whatever ends one of them ends the session:
an exception is the session's failure, and so is a return, unless the task
was started with ``may_return`` and that says the return was expected (the
pump returns at a clean stop). The first failure wins: what closing the
session causes afterwards (a cancelled read, a lost connection) is not
another failure. ``fail`` takes failures from callbacks too (the publisher's
outcome callback). Callers never compare task names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from cdc_relay.core import SessionFailed


class SessionTasks:
    """Start tasks, learn the first failure, cancel them all."""

    def __init__(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._tasks: list[asyncio.Task[Any]] = []
        self._on_failure = on_failure
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self._changed = asyncio.Event()  # a task ended, or a failure was reported
        self.closing = False

    def start(
        self,
        name: str,
        coro: Coroutine[Any, Any, Any],
        *,
        may_return: Callable[[], bool] | None = None,
    ) -> asyncio.Task[Any]:
        """Run ``coro`` as one of the session's tasks; ``may_return`` says when a return is fine."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(partial(self._done, may_return))
        self._tasks.append(task)
        return task

    def _done(self, may_return: Callable[[], bool] | None, task: asyncio.Task[Any]) -> None:
        self._changed.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(exc)
        elif may_return is None or not may_return():
            self.fail(SessionFailed(f"{task.get_name()} ended unexpectedly"))

    def fail(self, exc: BaseException) -> None:
        """The session failed (the first report wins; none count once it is closing)."""
        if self._failure is not None or self.closing:
            return
        self._failure = exc
        self._failed.set()
        self._changed.set()
        if self._on_failure is not None:
            self._on_failure(exc)

    @property
    def first_failure(self) -> BaseException | None:
        return self._failure

    def raise_failure(self) -> None:
        """Raise the first failure, if there was one."""
        if self._failure is not None:
            raise self._failure

    async def wait_any(self, *others: Awaitable[Any]) -> None:
        """Until a task ends, a failure is reported, or one of ``others`` finishes."""
        waiters = [asyncio.ensure_future(self._changed.wait())]
        waiters += [asyncio.ensure_future(other) for other in others]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def until(self, step: Awaitable[Any], abort: asyncio.Event, timeout: float) -> bool:
        """Wait for one step of a clean stop, at most ``timeout`` seconds.

        True if the step finished (and did not answer False); False if it timed
        out or ``abort`` was set (the step is cancelled). A failure meanwhile is raised.
        """
        step_future = asyncio.ensure_future(step)
        failed = asyncio.ensure_future(self._failed.wait())
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait(
                [step_future, failed, aborted],
                timeout=max(0.0, timeout),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            failed.cancel()
            aborted.cancel()
        self.raise_failure()
        if not step_future.done():
            step_future.cancel()
            return False
        return step_future.result() is not False

    async def cancel(self, task: asyncio.Task[Any]) -> None:
        """Cancel one task and wait until it ended."""
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def cancel_all(self) -> asyncio.Future[list[Any]]:
        """Cancel every task; the answer completes once all ended (bound it: see ``Session``)."""
        for task in self._tasks:
            task.cancel()
        return asyncio.gather(*self._tasks, return_exceptions=True)

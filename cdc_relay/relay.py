"""Run sessions, and start again after any failure.

A session (``session.Session``) is one replication connection, one AMQP
connection and one dead-letter connection, alive together. Any failure ends
the session: all connections close, and the next session starts again from the
slot's confirmed position after a backoff with jitter. Nothing is retried
inside a session, so there is exactly one recovery path to test. This module
decides what ends the process instead (a setting to fix, undecodable data)
and how long to wait before the next session.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Final

from cdc_relay.acks import AckTrackerError
from cdc_relay.backoff import reconnect_delay
from cdc_relay.config import Settings
from cdc_relay.core import PublishRefused
from cdc_relay.deadletters import DeadLettersUnwritable
from cdc_relay.deadline import event_within
from cdc_relay.errors import ConfigError, FatalError, SlotMissing
from cdc_relay.health import Problems
from cdc_relay.limits import BrokerLimits
from cdc_relay.loops import HEALTHY_SESSION_SECONDS, SESSION_KEY, poll_slot, retain_outbox
from cdc_relay.metrics import Metrics
from cdc_relay.pg.pgoutput import ProtocolError
from cdc_relay.router import Router
from cdc_relay.session import (
    SESSION_ERRORS,
    PositionBox,
    Session,
    certificate_rejected,
    describe,
)

log = logging.getLogger("cdc_relay")

# After streaming once, a slot that vanished (a failover to a server whose copy was
# not ready, or still being promoted) is asked for every 0.5-1.5 s for this long,
# then the relay exits 78. A synced failover slot is there as soon as the promoted
# server accepts writes, so this only has to outlast a slow promotion.
SLOT_MISSING_GRACE: Final = 20.0
SLOT_MISSING_RETRY: Final = (0.5, 1.5)


class Relay:
    """Runs sessions until asked to stop; raises ConfigError for what retrying cannot fix."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        outboxes: Sequence[Settings] = (),
    ) -> None:
        """``outboxes``: several outbox tables on the slot (``--config``), ``settings`` first."""
        self.settings = settings
        self.outboxes = tuple(outboxes) or (settings,)
        self.metrics = metrics or Metrics(settings.slot, [o.table for o in self.outboxes])
        self.router = Router.from_settings(settings)
        # One outbox: a refusal of its own exchange is an outage (limits.py says why).
        # Several: no table's refused exchange may block the others, so each one's rows
        # are dead-lettered instead (and published again once a re-check succeeds).
        own_exchange = settings.exchange if len(self.outboxes) == 1 else None
        self.limits = BrokerLimits.empty(own_exchange)
        self.problems = Problems()
        # Where this process's sessions confirmed up to: the next one starts there.
        self.confirmed = PositionBox()
        self._stop = asyncio.Event()
        self._checks_passed = asyncio.Event()  # some session passed its startup checks
        self._abort = asyncio.Event()

    def request_stop(self) -> None:
        """First call: stop cleanly. Second call: stop now, without waiting for confirms."""
        if self._stop.is_set():
            if not self._abort.is_set():
                log.warning("second stop request: exiting now; unconfirmed rows will be resent")
            self._abort.set()
        self._stop.set()

    def report_problem(self, key: str, text: str) -> None:
        """Say what is wrong (``key`` names the part: ``dead-letters``, ``resync``, ...).

        The state writer persists it within a second into the state row, where
        ``cdc-relay status`` shows it and turns unhealthy; reporting again keeps
        the start time. Any part of the relay may call this, from the event loop.
        """
        self.problems.report(key, text)

    def clear_problem(self, key: str) -> None:
        """That part is well again (a no-op if it reported nothing)."""
        self.problems.clear(key)

    async def run(self) -> None:
        # Beside the sessions, never ending them: the slot poll (active and standby
        # alike) and retention.
        background = [
            asyncio.create_task(
                poll_slot(
                    self.settings,
                    self.metrics,
                    self._stop,
                    self._checks_passed,
                    self.outboxes,
                ),
                name="cdc-relay-slot-poll",
            )
        ]
        for outbox in self.outboxes:
            if outbox.retention is not None:
                background.append(
                    asyncio.create_task(
                        retain_outbox(outbox, outbox.retention, self._stop),
                        name=f"cdc-relay-retention {outbox.table}",
                    )
                )
        try:
            await self._run_sessions()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _run_sessions(self) -> None:
        attempt = 0
        streamed = False  # some session of this process has streamed from the slot
        checked = False  # some session of this process passed the startup checks
        missing_since: float | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            refused = False  # the session ended on a broker refusal (a nack)
            session = Session(
                self.settings,
                self.metrics,
                self.router,
                self.limits,
                self._stop,
                self._abort,
                self.confirmed,
                problems=self.problems,
                checks_passed=self._checks_passed,
                outboxes=self.outboxes,
            )
            try:
                await session.run()
                return  # a session only returns normally when asked to stop
            except DeadLettersUnwritable as exc:
                if not (checked or session.checked):
                    raise  # a first start: a setting to fix, say so at once (exit 78)
                # It was writable before (a grant revoked, the table dropped, or a
                # standby taking over): retry like a lock until it is fixed.
                self.problems.report(SESSION_KEY, f"the last session ended: {exc}")
                log.warning("session ended: %s (retrying)", exc)
            except SlotMissing as exc:
                if not streamed:
                    raise  # never streamed: a wrong --slot or --dsn, say so at once
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > SLOT_MISSING_GRACE:
                    raise ConfigError(
                        f"{exc} (retried for {SLOT_MISSING_GRACE:.0f}s: dropped, or after a "
                        "failover the promoted standby held no sync-ready copy; see docs/ha.md "
                        "and docs/recovery.md)"
                    ) from None
                log.warning(
                    "session ended: %s (a failover in progress? retrying for up to %.0fs)",
                    exc,
                    SLOT_MISSING_GRACE,
                )
            except (ConfigError, FatalError):
                raise
            except (ProtocolError, AckTrackerError) as exc:
                # The same bytes would come again: retrying cannot help.
                raise FatalError(f"cannot process the replication stream: {exc}") from exc
            except SESSION_ERRORS as exc:
                rejected = certificate_rejected(exc)
                if rejected is not None:
                    raise ConfigError(rejected) from None
                refused = isinstance(exc, PublishRefused)
                # Persisted by the next session's state writer: `status` then says a
                # relay is running and why it keeps reconnecting, not "no relay".
                self.problems.report(SESSION_KEY, f"the last session ended: {describe(exc)}")
                # Session.run logged "session ended" already, before closing connections.
            finally:
                self.metrics.ready.set(0)
                self.metrics.set_role("starting")
                self.metrics.in_flight_messages.set(0)  # resent by the next session
                self.metrics.in_flight_bytes.set(0)
                self.metrics.amqp_blocked.set(0)
                checked = checked or session.checked
                if session.streamed:
                    streamed, missing_since = True, None
            if time.monotonic() - started > HEALTHY_SESSION_SECONDS or session.made_progress:
                attempt = 0
            delay = self._backoff(attempt, refused)
            if missing_since is not None:
                delay = random.uniform(*SLOT_MISSING_RETRY)  # the slot may appear any moment
            attempt += 1
            self.metrics.reconnects.inc()
            log.info("reconnecting in %.1fs", delay)
            await event_within(self._stop, delay)

    def _backoff(self, attempt: int, refused: bool) -> float:
        """Exponential backoff with full jitter; capped after a refusal (backoff.py says why)."""
        s = self.settings
        return reconnect_delay(
            attempt, s.reconnect_min, s.reconnect_max, refused=refused, uniform=random.uniform
        )

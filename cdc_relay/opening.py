"""Opening a session: the slot, the startup checks, the publisher, each step bounded.

The startup checks come first (one clear line for any misconfiguration). Then
the replication connection takes the slot: while another relay holds it, this
one stands by on that one connection (a hot standby must not open connections
in a loop), and checks again once it has the slot, because the slot's
confirmed position moved meanwhile. Only then does the relay connect to
RabbitMQ.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from cdc_relay.amqp import ExchangeError, Outcome, Publisher
from cdc_relay.config import Settings
from cdc_relay.core import SessionFailed
from cdc_relay.deadletters import DeadLetterWriter
from cdc_relay.deadline import event_within, within
from cdc_relay.errors import ConfigError, SlotMissing
from cdc_relay.pg import catalog, checks
from cdc_relay.pg.replication import (
    SQLSTATE_PREREQUISITE_STATE,
    SQLSTATE_UNDEFINED_OBJECT,
    ReplicationError,
    ReplicationStream,
    SlotInUse,
)
from cdc_relay.resync_guard import ResyncUnderWay, resync_holder
from cdc_relay.state import (
    Position,
    StateWriter,
    describe_lost_slot,
    read,
    recorded_position,
    table_name,
)

log = logging.getLogger("cdc_relay")

VALIDATE_TIMEOUT: Final = 30.0  # startup checks must answer within this
STANDBY_RETRY: Final = (0.5, 1.5)  # seconds between attempts to take a busy slot
# Seconds between checks while a resync runs: each check is a full validation on a
# new connection, and a resync takes minutes.
RESYNC_RETRY: Final = (2.0, 4.0)
# Bounded on its own (keepalives, tcp_user_timeout, statement_timeout), so the
# validation thread ends soon after VALIDATE_TIMEOUT, not whenever the network heals.
VALIDATION_CONNECTION: Final[dict[str, Any]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
    "application_name": "cdc-relay validation",
}


@dataclass(slots=True)
class Connections:
    """What a session has open; closing it never raises and never hangs for long."""

    stream: ReplicationStream | None = None
    publisher: Publisher | None = None
    dead_letters: DeadLetterWriter | None = None
    state: StateWriter | None = None

    async def close(self) -> None:
        if self.stream is not None:
            try:
                await self.stream.close()
            except Exception as exc:
                log.debug("closing replication connection: %r", exc)
        if self.publisher is not None:
            await self.publisher.close()
        if self.dead_letters is not None:
            await self.dead_letters.close()
        if self.state is not None:
            await self.state.close()


async def open_stream(settings: Settings) -> ReplicationStream:
    """The replication connection, with TCP keepalives so a dead peer is noticed."""
    return await ReplicationStream.connect(
        settings.dsn,
        keepalive_idle=settings.tcp_keepalive_idle,
        keepalive_interval=settings.tcp_keepalive_interval,
        keepalive_count=settings.tcp_keepalive_count,
    )


async def identify(stream: ReplicationStream, settings: Settings) -> tuple[str, int, int]:
    """IDENTIFY_SYSTEM, bounded by --pg-timeout like START_REPLICATION (a silent server)."""
    try:
        return await within(stream.identify_system(), settings.pg_timeout)
    except TimeoutError:
        raise SessionFailed(
            f"IDENTIFY_SYSTEM got no answer in {settings.pg_timeout:g}s (--pg-timeout)"
        ) from None


async def take_slot(
    stream: ReplicationStream,
    settings: Settings,
    stop: asyncio.Event,
    start_lsn: int = 0,
    *,
    messages: bool,
    on_standby: Callable[[], None] | None = None,
) -> bool | None:
    """START_REPLICATION (at ``start_lsn`` or the slot's position); stand by while it is busy.

    ``messages`` (the outbox uses emitted messages: validation found its key)
    asks pgoutput for logical messages; without it no role's message is even sent.
    Returns whether it had to stand by (the slot's position may have moved
    meanwhile), or None if asked to stop first. ``on_standby`` is called when it
    starts standing by (the relay's role).
    """
    standing_by = False
    while True:
        try:
            # Bounded like every other step: a server that took the command and then
            # went silent (a restart caught half-way) must end the session, not hang it.
            try:
                await within(
                    stream.start(settings.slot, settings.publication, start_lsn, messages=messages),
                    settings.pg_timeout,
                )
            except TimeoutError:
                raise SessionFailed(
                    f"START_REPLICATION got no answer in {settings.pg_timeout:g}s (--pg-timeout)"
                ) from None
            if standing_by:
                log.info("slot %s is free: taking over", settings.slot)
            return standing_by
        except SlotInUse as exc:
            if not standing_by:
                log.info("standing by: %s", exc)
                if on_standby is not None:
                    on_standby()
            standing_by = True
        except ReplicationError as exc:
            if exc.sqlstate == SQLSTATE_UNDEFINED_OBJECT:
                holder = await asyncio.to_thread(_resync_holder, settings)
                if holder is not None:  # it dropped the slot and is creating it again
                    raise SessionFailed(
                        f"replication slot {settings.slot} is being recreated by a resync "
                        f"(pid {holder}); standing by until it has finished"
                    ) from None
            if exc.sqlstate in (SQLSTATE_UNDEFINED_OBJECT, SQLSTATE_PREREQUISITE_STATE):
                hint = await asyncio.to_thread(describe_lost_slot, settings)
                error = SlotMissing if exc.sqlstate == SQLSTATE_UNDEFINED_OBJECT else ConfigError
                raise error(
                    f"replication slot {settings.slot} cannot be used: {exc}; {hint}"
                ) from None
            raise
        await event_within(stop, random.uniform(*STANDBY_RETRY))
        if stop.is_set():
            log.info("asked to stop while standing by for slot %s: exiting", settings.slot)
            return None


def _resync_holder(settings: Settings) -> int | None:
    """The pid of a resync of the slot running now; None also when that cannot be asked."""
    try:
        with catalog.connect(settings.dsn, **VALIDATION_CONNECTION) as conn:
            return resync_holder(conn, settings.slot)
    except Exception:  # the caller reports the missing slot instead
        return None


async def validate_when_no_resync(
    settings: Settings, stop: asyncio.Event, outboxes: Sequence[Settings] = ()
) -> checks.StartupFacts | None:
    """``validate``, standing by while a resync of the slot is under way (None: asked to stop).

    A standby that waits and takes over once the resync finished is what a
    supervisor expects; an interrupted resync is a ConfigError (exit 78 naming
    the command), because no process is going to finish it.
    """
    waiting = False
    while True:
        try:
            facts = await validate(settings, outboxes)
        except ResyncUnderWay as exc:
            if not waiting:
                log.warning("standing by: %s", exc)
                waiting = True
        else:
            if waiting:
                log.info("the resync of slot %s has finished: going on", settings.slot)
            return facts
        await event_within(stop, random.uniform(*RESYNC_RETRY))
        if stop.is_set():
            if waiting:
                log.info("asked to stop while standing by for slot %s: exiting", settings.slot)
            return None


def _read_recorded(settings: Settings) -> Position | None:
    with catalog.connect(settings.dsn, **VALIDATION_CONNECTION) as conn:
        conn.execute("SET statement_timeout = '5s'")
        return recorded_position(read(conn, table_name(settings), settings.slot))


async def recorded(settings: Settings) -> Position | None:
    """The state row's confirmed position; None when there is none or it cannot be read.

    Only ever a shortcut (the slot's own position is always safe), so a failure
    to read it costs duplicates, never a session.
    """
    try:
        return await within(asyncio.to_thread(_read_recorded, settings), VALIDATE_TIMEOUT)
    except (psycopg.Error, ConfigError, OSError, TimeoutError) as exc:
        log.debug("cannot read the recorded position: %r", exc)
        return None


async def validate(settings: Settings, outboxes: Sequence[Settings] = ()) -> checks.StartupFacts:
    """Startup checks on a normal connection; a partitioned network cannot hang them."""

    def check() -> checks.StartupFacts:
        with catalog.connect(settings.dsn, **VALIDATION_CONNECTION) as conn:
            conn.execute("SET statement_timeout = '20s'")
            return checks.validate(conn, settings, outboxes)

    try:
        return await within(asyncio.to_thread(check), VALIDATE_TIMEOUT)
    except TimeoutError:
        raise SessionFailed(f"startup checks got no answer in {VALIDATE_TIMEOUT:.0f}s") from None


async def open_publisher(
    settings: Settings,
    on_outcome: Callable[[Outcome], None],
    outboxes: Sequence[Settings] = (),
) -> Publisher:
    """Connect (any listed node) and declare the default exchange(s) over that same connection.

    With several outboxes, each one's default exchange (``settings`` is the first).
    """
    publisher = Publisher.from_settings(settings, on_outcome)
    await publisher.connect()
    try:
        if settings.declare_exchange:
            declared: set[str] = set()
            for each in outboxes or (settings,):
                if each.message_format != "celery" and each.exchange not in declared:
                    await publisher.declare_exchange(each.exchange)
                    declared.add(each.exchange)
    except ExchangeError as exc:
        await publisher.close()
        raise ConfigError(
            f"{exc}; fix --exchange, or run with --no-declare if the exchange is managed "
            "elsewhere and this user may not declare it"
        ) from None
    except BaseException:
        await publisher.close()
        raise
    return publisher

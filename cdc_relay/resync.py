"""``cdc-relay resync``: recreate a lost slot and publish the outbox rows it missed, with no gap.

The slot is recreated with ``CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')``;
the rows with ``created_at >= since`` are read in that snapshot (``SET
TRANSACTION SNAPSHOT`` in a REPEATABLE READ transaction) and published with
confirms, through the relay's router and dead-letter rules. A row committed
before the slot's consistent point is in the snapshot; one committed after it
comes through the new slot: nothing falls between the two. Rows sent here and
again by the relay (or by a re-run) are duplicates, which consumers dedupe on
``message_id``, as after any failure.

Safe to interrupt: the state table marks the resync as under way, so the next
``resync`` may drop the slot it left behind and send everything again. Emitted
messages (``outbox_emit``) exist only in WAL and cannot be resynced.

``plan`` (synchronous, read-only) decides and refuses; ``execute`` performs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay import resync_guard, state
from cdc_relay.amqp import (
    ExchangeError,
    Outcome,
    Publisher,
    PublishFailed,
    UnpublishableMessage,
)
from cdc_relay.config import Settings
from cdc_relay.core import _reason as mapping_reason  # the stream's own dead-letter reasons
from cdc_relay.deadletters import DeadLetterWriter, check_writable
from cdc_relay.envelope import Envelope
from cdc_relay.errors import ConfigError, RelayError
from cdc_relay.letters import DeadLetter
from cdc_relay.lsn import format_lsn
from cdc_relay.pg import catalog, checks
from cdc_relay.pg.catalog import FAILOVER_MIN_VERSION
from cdc_relay.pg.replication import ReplicationStream
from cdc_relay.pg.slotwait import SlotCreationWatch
from cdc_relay.redact import one_line
from cdc_relay.router import Router
from cdc_relay.rows import TEXT_SELECT, OutboxRow, row_from_text
from cdc_relay.schema import qualified
from cdc_relay.state import DEFAULT_MARGIN

BATCH: Final = 1000  # rows per server-side cursor fetch
DEAD_LETTER_BATCH: Final = 500
PROGRESS_INTERVAL: Final = 1.0  # seconds between progress lines


class ResyncFailed(RelayError):
    """The resync stopped part way; running it again sends everything again."""

    exit_code = 1


def parse_since(text: str) -> datetime:
    """ISO 8601 (``2026-11-28T09:00:00+00:00``, ``...Z``, ``2026-11-28 09:00``); bare = UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time like 2026-11-28T09:00:00+00:00"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass(frozen=True, slots=True)
class Plan:
    """What ``execute`` will do, decided from the catalogs and the state row."""

    slot: str
    since: datetime
    since_source: str  # "--since", "recorded position", ...
    old_slot: str  # "missing", "lost (wal_status=lost)", "left by an interrupted resync"
    failover: bool
    rows: int  # rows with created_at >= since when planned (more may commit meanwhile)
    # The layout's columns (pg.checks.text_rows); None: our own columns.
    reading: checks.TextRows | None = None

    def describe(self) -> list[str]:
        drop = "" if self.old_slot == "missing" else "drop it, "
        return [
            f"replication slot {self.slot}: {self.old_slot}: {drop}create it again"
            + (" (failover)" if self.failover else ""),
            f"outbox rows since {self.since.astimezone(UTC).isoformat()} "
            f"({self.since_source}): {self.rows}",
        ]


@dataclass(frozen=True, slots=True)
class Summary:
    rows: int
    confirmed: int
    dead_lettered: int
    consistent_lsn: int
    seconds: float

    def line(self, plan: Plan) -> str:
        return (
            f"resync done: {self.rows} row(s) since {plan.since.astimezone(UTC).isoformat()} "
            f"read, {self.confirmed} confirmed by the broker, {self.dead_lettered} dead-lettered, "
            f"in {self.seconds:.1f}s; slot {plan.slot} streams from "
            f"{format_lsn(self.consistent_lsn)}: start `cdc-relay run`"
        )


def _slot_row(conn: psycopg.Connection[Any], slot: str) -> dict[str, Any] | None:
    """Every column of pg_replication_slots for the slot (they differ between 16, 17, 18)."""
    row = conn.execute(
        "SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = %s", (slot,)
    ).fetchone()
    return None if row is None else dict(row[0])


def invalidation(slot: dict[str, Any]) -> str | None:
    """Why the slot can no longer stream, or None when it is healthy."""
    if slot.get("wal_status") == "lost":
        return "lost (wal_status=lost)"
    if slot.get("invalidation_reason"):  # PostgreSQL 17+
        return f"invalidated ({slot['invalidation_reason']})"
    if slot.get("conflicting"):  # PostgreSQL 16, logical slots on a standby
        return "invalidated (conflicting)"
    return None


def plan(
    conn: psycopg.Connection[Any],
    settings: Settings,
    since: datetime | None,
    *,
    margin: timedelta = DEFAULT_MARGIN,
    failover: bool = False,
) -> Plan:
    """Decide what to do, or raise ConfigError (one line) for why it must not happen."""
    catalog.check_wal_level(conn)
    schema, table = settings.table_parts
    if checks.check_outbox_table(conn, settings) is None:
        raise ConfigError(
            f"outbox table {schema}.{table} does not exist: resync reads the rows to send from "
            "it (messages from outbox_emit exist only in WAL and cannot be resynced); "
            "recreate the slot with `cdc-relay init`"
        )
    if not catalog.publication_exists(conn, settings.publication):
        raise ConfigError(
            f"publication {settings.publication} does not exist; run `cdc-relay init` first"
        )
    check_writable(conn, settings.dead_letter_table)
    slot = settings.slot
    recorded = state.read(conn, state.table_name(settings), slot)
    holder = resync_guard.resync_holder(conn, slot)
    if holder is not None:
        raise ConfigError(
            f"another resync of replication slot {slot} is under way (pid {holder}): "
            "wait for it to finish (one resync at a time)"
        )
    unfinished = recorded is not None and recorded.resync_since is not None
    old = _slot_row(conn, slot)
    if old is None:
        old_slot = "missing"
    else:
        if old.get("active") and unfinished:
            assert recorded is not None and recorded.resync_since is not None
            raise ConfigError(
                f"replication slot {slot} is in use by pid {old.get('active_pid')}, but the "
                "resync that created it did not finish, so that relay may skip rows of its "
                "snapshot: stop every relay on the slot, then run "
                f"`{resync_guard.resync_command(settings, recorded.resync_since)}`"
            )
        if old.get("active"):
            raise ConfigError(
                f"replication slot {slot} is in use by pid {old.get('active_pid')}; resync "
                "refuses while a relay holds it (stop the relay, or let it stream: a slot in "
                "use is not lost)"
            )
        if old.get("slot_type") != "logical" or old.get("plugin") != "pgoutput":
            raise ConfigError(f"replication slot {slot} is not a logical pgoutput slot; fix --slot")
        why = invalidation(old)
        if why is not None:
            old_slot = why
        elif unfinished:
            old_slot = "left by an interrupted resync"
        else:
            raise ConfigError(
                f"replication slot {slot} is not lost (wal_status={old.get('wal_status')}); "
                "resync would drop it, and with it any outbox_emit messages it still holds: "
                "start `cdc-relay run` instead, or `cdc-relay drop` it first if you mean it"
            )
    candidates: list[tuple[datetime, str]] = []
    if since is not None:
        candidates.append((since, "--since"))
    elif recorded is not None and recorded.confirmed_commit_at is not None:
        candidates.append(
            (
                recorded.confirmed_commit_at - margin,
                f"recorded last confirmed commit {recorded.confirmed_commit_at.isoformat()} "
                f"minus {margin}",
            )
        )
    if recorded is not None and recorded.resync_since is not None:
        # An interrupted resync may not have sent its oldest rows: start no later than it.
        candidates.append((recorded.resync_since, "an interrupted resync's start"))
    if not candidates:
        raise ConfigError(
            f"no --since given and no position recorded for slot {slot} in "
            f"{'.'.join(state.table_name(settings))}: pass --since TIMESTAMP (when the relay "
            "last delivered, minus the length of your longest transaction)"
        )
    start, source = min(candidates, key=lambda c: c[0])
    if old is not None:
        failover = failover or bool(old.get("failover"))
    if failover and _server_version(conn) < FAILOVER_MIN_VERSION:
        failover = False  # the old slot could not have had it either
    reading = checks.text_rows(conn, settings)
    if reading.created_at is None:
        raise ConfigError(
            f"outbox table {schema}.{table} has no creation-time column: resync selects rows "
            "by it; map one with --column created_at=COLUMN (a timestamp column)"
        )
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {} >= %s").format(
            qualified(schema, table), reading.created_at
        ),
        (start,),
    ).fetchone()
    return Plan(slot, start, source, old_slot, failover, int(row[0]) if row else 0, reading)


def _server_version(conn: psycopg.Connection[Any]) -> int:
    return int(conn.info.server_version)


class _Run:
    """One resync's publishing state: rows in flight, outcomes, dead letters, progress."""

    def __init__(self, settings: Settings, consistent_lsn: int) -> None:
        self.settings = settings
        self.router = Router.from_settings(settings)
        self.lsn = consistent_lsn
        self.rows: dict[int, OutboxRow] = {}
        self.letters: list[DeadLetter] = []
        self.failure: str | None = None
        self.read = 0
        self.confirmed = 0
        self.dead_lettered = 0

    def envelope(self, row: OutboxRow) -> Envelope | None:
        """The envelope, or None when the row became a dead letter (same rules as the stream)."""
        try:
            return self.router.route(row)  # the one policy: exchanges, CC/BCC, size
        except Exception as exc:
            self.dead(row, mapping_reason(exc))
            return None

    def dead(self, row: OutboxRow, reason: str) -> None:
        self.letters.append(DeadLetter(row.id, reason, row.as_dict(), self.lsn))

    def on_outcome(self, outcome: Outcome) -> None:
        for seq in outcome.confirmed:
            self.rows.pop(seq, None)
        self.confirmed += len(outcome.confirmed)
        for seq, error in outcome.failed:
            row = self.rows.pop(seq, None)
            if error.returned and self.settings.on_unroutable == "deadletter" and row is not None:
                self.dead(row, error.reason)
            elif self.failure is None:
                self.failure = f"publish of outbox row {row.id if row else seq} failed: {error}"
        if outcome.lost is not None and self.failure is None:
            self.failure = str(outcome.lost)


# (rows read and published, confirmed, dead-lettered), every PROGRESS_INTERVAL.
Counts = Callable[[int, int, int], None]


async def execute(
    settings: Settings,
    plan: Plan,
    progress: Callable[[str], None] = lambda _: None,
    on_count: Counts | None = None,
) -> Summary:
    """Drop and recreate the slot, publish the snapshot's rows since ``plan.since``."""
    started = time.monotonic()
    state_table = state.table_name(settings)
    # Held until the end: relays stand by while it is held, and see an interrupted
    # resync (the mark without the lock) once this connection is gone.
    with catalog.connect(settings.dsn, application_name="cdc-relay resync") as lock:
        _lock_resync(lock, plan.slot)
        return await _execute_locked(settings, plan, state_table, started, progress, on_count)


def _lock_resync(conn: psycopg.Connection[Any], slot: str) -> None:
    """Take the resync's advisory lock, or say (one line) which resync holds it."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", resync_guard.resync_lock_key(slot)
    ).fetchone()
    if not (row and row[0]):
        holder = resync_guard.resync_holder(conn, slot)
        raise ConfigError(
            f"another resync of replication slot {slot} is under way (pid {holder}): "
            "wait for it to finish (one resync at a time)"
        )


async def _execute_locked(
    settings: Settings,
    plan: Plan,
    state_table: tuple[str, str],
    started: float,
    progress: Callable[[str], None],
    on_count: Counts | None = None,
) -> Summary:
    with catalog.connect(settings.dsn) as conn:
        state.create(conn, state_table)
        previous = state.read(conn, state_table, plan.slot)
        if plan.old_slot == "missing" and _slot_row(conn, plan.slot) is not None:
            raise ConfigError(
                f"replication slot {plan.slot} was created meanwhile (by another resync or "
                "init?): run the command again to see what it would do now"
            )
        state.mark_resync(conn, state_table, plan.slot, plan.since)
        if plan.old_slot != "missing":
            progress(
                f"resync: dropping replication slot {plan.slot} ({plan.old_slot}) first: "
                "slot names are unique and a slot cannot be renamed, so the new one can only "
                "be created once the old one is gone"
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (plan.slot,))
            except psycopg.errors.ObjectInUse:
                # Nothing was dropped: the slot is the relay's again, not an unfinished resync's.
                state.mark_resync(
                    conn, state_table, plan.slot, previous.resync_since if previous else None
                )
                raise ConfigError(
                    f"replication slot {plan.slot} became active; resync refuses while a relay "
                    "holds it"
                ) from None
            except psycopg.errors.UndefinedObject:
                pass  # dropped meanwhile: nothing to drop
            progress(f"resync: dropped replication slot {plan.slot} ({plan.old_slot})")
    stream = await ReplicationStream.connect(settings.dsn)
    try:
        with SlotCreationWatch(
            settings.dsn,
            f"resync: creating replication slot {plan.slot}",
            progress,
            exclude_pid=stream.backend_pid,
        ):
            consistent, snapshot = await stream.create_slot_with_snapshot(plan.slot)
        progress(
            f"resync: created replication slot {plan.slot} at {format_lsn(consistent)}; "
            f"publishing rows since {plan.since.astimezone(UTC).isoformat()} from its snapshot"
        )
        run = _Run(settings, consistent)
        await _publish_snapshot(settings, plan, snapshot, run, progress, on_count)
    finally:
        # Kept open until the read is done: the exported snapshot lives as long as it.
        await stream.close()
    with catalog.connect(settings.dsn) as conn:
        if plan.failover:
            _set_failover(settings.dsn, plan.slot)
        state.mark_resync(conn, state_table, plan.slot, None)
    return Summary(
        run.read, run.confirmed, run.dead_lettered, consistent, time.monotonic() - started
    )


async def _publish_snapshot(
    settings: Settings,
    plan: Plan,
    snapshot: str,
    run: _Run,
    progress: Callable[[str], None],
    on_count: Counts | None = None,
) -> None:
    reader = await psycopg.AsyncConnection.connect(
        settings.dsn, connect_timeout=10, application_name="cdc-relay resync"
    )
    publisher = Publisher.from_settings(settings, run.on_outcome)
    writer: DeadLetterWriter | None = None
    try:
        await reader.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await reader.set_read_only(True)
        # The first statement of the transaction: the rows exactly as of the slot's start.
        await reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        await reader.execute("SET LOCAL TimeZone TO 'UTC'")
        await publisher.connect()
        if settings.declare_exchange and settings.message_format != "celery":
            try:
                await publisher.declare_exchange(settings.exchange)
            except ExchangeError as exc:
                raise ConfigError(str(exc)) from None
        writer = await DeadLetterWriter.connect(settings.dsn, settings.dead_letter_table)
        reading = plan.reading or checks.TextRows(
            sql.SQL(TEXT_SELECT), row_from_text, sql.Identifier("created_at"), sql.Identifier("id")
        )
        created = reading.created_at or sql.Identifier("created_at")
        query = sql.SQL("SELECT {} FROM {} WHERE {} >= %s ORDER BY {}, {}").format(
            reading.select, qualified(*settings.table_parts), created, created, reading.id
        )
        last_report = time.monotonic()
        exchanges: dict[str, str | None] = {}
        async with reader.cursor(name="cdc_relay_resync") as cursor:
            cursor.itersize = BATCH
            await cursor.execute(query, (plan.since,))
            async for values in cursor:
                run.read += 1
                row = reading.read(values)
                envelope = run.envelope(row)
                if envelope is not None and (
                    refused := await publisher.exchange_refusal(envelope.exchange, exchanges)
                ):
                    run.dead(row, refused)
                    envelope = None
                if envelope is not None:
                    run.rows[run.read] = row
                    try:
                        await publisher.publish(run.read, envelope)
                    except UnpublishableMessage as exc:
                        run.rows.pop(run.read, None)
                        run.dead(row, str(exc))
                    except PublishFailed as exc:
                        run.failure = run.failure or str(exc)
                if run.failure is not None:
                    raise ResyncFailed(_interrupted(run.failure, run))
                if len(run.letters) >= DEAD_LETTER_BATCH:
                    await _store(writer, run)
                now = time.monotonic()
                if now - last_report >= PROGRESS_INTERVAL:
                    last_report = now
                    if on_count is not None:
                        on_count(run.read, run.confirmed, run.dead_lettered + len(run.letters))
                        continue
                    progress(
                        f"resync: {run.read}/{max(plan.rows, run.read)} row(s) published, "
                        f"{run.confirmed} confirmed, {run.dead_lettered + len(run.letters)} "
                        "dead-lettered"
                    )
        if not await publisher.wait_confirmed(settings.confirm_timeout):
            raise ResyncFailed(
                _interrupted(run.failure or f"no confirm within {settings.confirm_timeout:g}s", run)
            )
        if run.failure is not None:
            raise ResyncFailed(_interrupted(run.failure, run))
        await _store(writer, run)
    finally:
        await publisher.close()
        if writer is not None:
            await writer.close()
        await reader.close()  # ends the read-only transaction


async def _store(writer: DeadLetterWriter, run: _Run) -> None:
    letters, run.letters = run.letters, []
    await writer.write(letters)
    run.dead_lettered += len(letters)


def _interrupted(why: str, run: _Run) -> str:
    return (
        f"resync stopped after {run.read} row(s) ({run.confirmed} confirmed): {one_line(why)}; "
        "nothing is lost: run the same command again (it sends every row again)"
    )


def _set_failover(dsn: str, slot: str) -> None:
    """Keep the old slot's failover flag (PostgreSQL 17+; a walsender command)."""
    with psycopg.connect(dsn, autocommit=True, replication="database") as conn:
        conn.execute(
            sql.SQL("ALTER_REPLICATION_SLOT {} ( FAILOVER true )").format(sql.Identifier(slot))
        )


async def run_resync(
    settings: Settings,
    plan: Plan,
    progress: Callable[[str], None],
    on_count: Counts | None = None,
) -> Summary:
    """``execute`` with a clean one-line failure for a broker that cannot be reached."""
    try:
        return await execute(settings, plan, progress, on_count)
    except (OSError, psycopg.OperationalError, TimeoutError, PublishFailed) as exc:
        raise ResyncFailed(
            f"resync stopped: {type(exc).__name__}: {one_line(str(exc))}; nothing is lost: "
            "run the same command again"
        ) from None

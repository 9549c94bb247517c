"""The operator's report (``cdc-relay status``): one typed ``SlotStatus``.

What an operator asks first: is a relay streaming, how far behind is it, how
much WAL does its slot hold, and what did the running relay last report about
itself. The CLI renders a ``SlotStatus`` as text or JSON; anything else that
reports on the slot reads the same dataclass rather than its own queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay import accel, state
from cdc_relay.config import Settings
from cdc_relay.errors import ConfigError
from cdc_relay.pg.catalog import (
    FAILOVER_MIN_VERSION,
    TIMEOUT_ERRORS,
    SlotInfo,
    could_not_read,
    missing_privilege,
    publication_exists,
    slot_info,
    table_exists,
)
from cdc_relay.pg.checks import validate
from cdc_relay.redact import one_line
from cdc_relay.schema import emit_key_table, function_names, qualified


@dataclass(slots=True)
class PrimarySlot:
    """The slot as a primary sees it (only when the slot exists)."""

    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    active_client: str | None  # application_name and address of the walsender's client
    failover: bool | None  # None: the server predates failover slots
    confirmed_flush_lsn: str | None
    restart_lsn: str | None
    wal_status: str | None
    current_wal_lsn: str
    lag_bytes: int | None  # WAL the relay has not confirmed
    retained_wal_bytes: int | None  # WAL the slot keeps on disk
    safe_wal_size: int | None
    # How long ago the newest confirmed commit was, while WAL is unconfirmed (0 when
    # nothing is; None when the relay recorded no commit or its state is unreadable).
    lag_seconds: float | None = None


@dataclass(slots=True)
class StandbySlot:
    """A standby's copy of the slot: could this standby take over after a promotion."""

    failover: bool | None
    synced: bool | None
    temporary: bool | None
    failover_ready: bool  # synced and not temporary: survives promotion
    confirmed_flush_lsn: str | None
    replay_lsn: str | None


@dataclass(slots=True)
class SlotStatus:
    """Everything ``cdc-relay status`` reports; the CLI renders it (``as_dict``).

    ``problems`` make it unhealthy; ``warnings`` name
    a risk, not an outage. A primary fills ``primary`` (when the slot exists) and
    the publication fields; a standby fills ``standby`` only.
    """

    role: str  # "primary" or "standby"
    slot: str
    slot_exists: bool
    primary: PrimarySlot | None = None
    standby: StandbySlot | None = None
    publication: str = ""
    publication_exists: bool = False
    publication_tables: list[str] = field(default_factory=list)
    dead_letter_table_exists: bool = False
    dead_letters_pending: int | None = None  # None: unreadable (privilege or lock)
    # One per outbox table (several with ``--config``): table, in_publication,
    # dead_letter_table, dead_letter_table_exists, dead_letters_pending.
    tables: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The hot path this installation runs: "compiled" or "pure-python" (cdc_relay.accel).
    implementation: str = field(default_factory=accel.implementation)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """``status --json``, schema 1: every key always present, null where unknown.

        Scripts read it by key, so its shape never depends on the state (a missing
        slot, a standby): ``cdc_relay.status_view`` renders the text from it too.
        """
        primary, standby = self.primary, self.standby
        on_primary = self.role == "primary"
        copy_ready = standby.failover_ready if standby is not None else None
        return {
            "schema": STATUS_SCHEMA,
            "role": self.role,
            "slot": self.slot,
            "slot_exists": self.slot_exists,
            "plugin": primary.plugin if primary else None,
            "database": primary.database if primary else None,
            "active": primary.active if primary else None,
            "active_pid": primary.active_pid if primary else None,
            "active_client": primary.active_client if primary else None,
            "failover": primary.failover if primary else standby.failover if standby else None,
            "synced": standby.synced if standby else None,
            "temporary": standby.temporary if standby else None,
            "failover_ready": copy_ready,
            "confirmed_flush_lsn": (
                primary.confirmed_flush_lsn
                if primary
                else standby.confirmed_flush_lsn
                if standby
                else None
            ),
            "restart_lsn": primary.restart_lsn if primary else None,
            "replay_lsn": standby.replay_lsn if standby else None,
            "wal_status": primary.wal_status if primary else None,
            "current_wal_lsn": primary.current_wal_lsn if primary else None,
            "lag_bytes": primary.lag_bytes if primary else None,
            "lag_seconds": primary.lag_seconds if primary else None,
            "retained_wal_bytes": primary.retained_wal_bytes if primary else None,
            "safe_wal_size": primary.safe_wal_size if primary else None,
            "publication": self.publication if on_primary else None,
            "publication_exists": self.publication_exists if on_primary else None,
            "publication_tables": list(self.publication_tables) if on_primary else None,
            "dead_letter_table_exists": self.dead_letter_table_exists if on_primary else None,
            "dead_letters_pending": self.dead_letters_pending,
            "tables": [dict(t) for t in self.tables] if on_primary else None,
            "healthy": self.healthy,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "implementation": self.implementation,
        }


STATUS_SCHEMA: Final = 1
"""The version of ``status --json``: raised when a key changes meaning or goes away."""


def status(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    require_active: bool = True,
    max_lag_bytes: int | None = None,
    max_stall: timedelta | None = None,
    outboxes: Sequence[Settings] = (),
) -> SlotStatus:
    """What an operator asks first: is it streaming, how far behind, how much WAL is held.

    ``healthy`` is True only when validation passes, a relay is attached (unless
    ``require_active`` is False) and the lag is within ``max_lag_bytes``;
    ``problems`` say why not, naming a missing privilege when that is the cause.
    Pointed at a standby it answers the failover question instead (``standby_status``).
    ``warnings`` never make it unhealthy: they name a risk, not an outage.
    """
    if _in_recovery(conn):
        return standby_status(conn, settings)
    info = slot_info(conn, settings.slot)
    result = SlotStatus(role="primary", slot=settings.slot, slot_exists=info is not None)
    problems, warnings = result.problems, result.warnings
    health = _relay_health(conn, settings, problems)
    if info is not None:
        result.primary = primary = _primary_slot(conn, settings.slot, info)
        if primary.lag_bytes is not None:
            primary.lag_seconds = (
                0.0 if primary.lag_bytes <= 0 else _confirmed_commit_age(conn, settings)
            )
        failover, lag = primary.failover, primary.lag_bytes
        retention = _wal_retention(settings.slot, info.wal_status, primary.retained_wal_bytes)
        if info.wal_status == "unreserved":
            problems.append(retention)
        elif retention:
            warnings.append(retention)
        if failover:
            warnings += _failover_warnings(conn, settings.slot)
        if require_active and not info.active:
            problems.append(_not_attached(settings.slot, health))
        if max_lag_bytes is not None and lag is not None and lag > max_lag_bytes:
            problems.append(f"lag {lag} bytes exceeds --max-lag-bytes {max_lag_bytes}")
    pub_tables = conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s"
        " ORDER BY 1",
        (settings.publication,),
    ).fetchall()
    result.publication = settings.publication
    result.publication_exists = publication_exists(conn, settings.publication)
    result.publication_tables = [r[0] for r in pub_tables]
    _count_dead_letters(conn, settings, result)
    _per_table(conn, outboxes or [settings], result)
    problems += _relay_reports(health, max_stall)
    try:
        validate(conn, settings, outboxes)
    except ConfigError as exc:
        problems.insert(0, str(exc))
    except psycopg.errors.InsufficientPrivilege as exc:
        problems.insert(0, missing_privilege(conn, one_line(str(exc))))
    warnings += emit_warnings(conn, settings)
    return result


def poll(
    conn: psycopg.Connection[Any], settings: Settings, outboxes: Sequence[Settings] = ()
) -> SlotStatus:
    """The slot's numbers for /metrics (lag, retained WAL, wal_status, dead letters pending).

    The same queries as ``status`` reads them, without its checks: run every
    ``--slot-poll-interval`` by the active relay and the standby alike. On a
    server in recovery it is the standby's report (no WAL position to measure).
    """
    if _in_recovery(conn):
        return standby_status(conn, settings)
    info = slot_info(conn, settings.slot)
    result = SlotStatus(role="primary", slot=settings.slot, slot_exists=info is not None)
    if info is not None:
        result.primary = _primary_slot(conn, settings.slot, info)
    _count_dead_letters(conn, settings, result)
    if len(outboxes) > 1:  # pending dead letters of every outbox of the slot
        _per_table(conn, outboxes, result)
    return result


def _primary_slot(conn: psycopg.Connection[Any], slot: str, info: SlotInfo) -> PrimarySlot:
    """The slot's positions and how far behind the current WAL they are."""
    lag = conn.execute(
        "SELECT pg_current_wal_lsn()::text,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, safe_wal_size"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    assert lag is not None
    return PrimarySlot(
        plugin=info.plugin,
        database=info.database,
        active=info.active,
        active_pid=info.active_pid,
        active_client=_client_of(conn, info.active_pid),
        failover=_slot_flags(conn, slot).get("failover"),
        confirmed_flush_lsn=info.confirmed_flush_lsn,
        restart_lsn=info.restart_lsn,
        wal_status=info.wal_status,
        current_wal_lsn=lag[0],
        lag_bytes=lag[1],
        retained_wal_bytes=lag[2],
        safe_wal_size=lag[3],
    )


def _per_table(
    conn: psycopg.Connection[Any], outboxes: Sequence[Settings], result: SlotStatus
) -> None:
    """One entry per outbox table; with several, ``dead_letters_pending`` is their sum."""
    for index, each in enumerate(outboxes):
        part = result
        if index > 0:
            part = SlotStatus(role="primary", slot=result.slot, slot_exists=result.slot_exists)
            _count_dead_letters(conn, each, part)
            result.problems += part.problems
        name = ".".join(each.table_parts)
        result.tables.append(
            {
                "table": name,
                "in_publication": name in result.publication_tables,
                "dead_letter_table": ".".join(each.dead_letter_table),
                "dead_letter_table_exists": part.dead_letter_table_exists,
                "dead_letters_pending": part.dead_letters_pending,
            }
        )
    if len(result.tables) > 1:
        counts = [t["dead_letters_pending"] for t in result.tables]
        unreadable = any(
            t["dead_letter_table_exists"] and t["dead_letters_pending"] is None
            for t in result.tables
        )
        result.dead_letter_table_exists = all(t["dead_letter_table_exists"] for t in result.tables)
        result.dead_letters_pending = None if unreadable else sum(c or 0 for c in counts)


def _count_dead_letters(
    conn: psycopg.Connection[Any], settings: Settings, result: SlotStatus
) -> None:
    """Fill the dead-letter fields; what cannot be read is a problem, never an exception."""
    dl_schema, dl_table = settings.dead_letter_table
    if not table_exists(conn, dl_schema, dl_table):
        return
    result.dead_letter_table_exists = True
    try:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE replayed_at IS NULL").format(
                qualified(dl_schema, dl_table)
            )
        ).fetchone()
        result.dead_letters_pending = row[0] if row else 0
    except psycopg.errors.InsufficientPrivilege:
        result.problems.append(missing_privilege(conn, f"SELECT on {dl_schema}.{dl_table}"))
    except TIMEOUT_ERRORS as exc:
        result.problems.append(could_not_read(f"dead-letter table {dl_schema}.{dl_table}", exc))


def emit_warnings(conn: psycopg.Connection[Any], settings: Settings) -> list[str]:
    """What the relay cannot enforce about emitted messages (only where the outbox uses them)."""
    keys = emit_key_table(settings.table_parts)
    if not table_exists(conn, *keys):
        return []
    schema = settings.table_parts[0]
    emit = f"{schema}.{function_names(settings.table_parts)[1]}"
    key_name = ".".join(keys)
    row = conn.execute(
        "SELECT (SELECT bool_or(has_function_privilege('public', p.oid, 'EXECUTE'))"
        "        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        "        WHERE n.nspname = %s AND p.proname = %s),"
        " has_table_privilege('public', %s::regclass, 'SELECT'),"
        " (SELECT bool_or(has_function_privilege('public', oid, 'EXECUTE')) FROM pg_proc"
        "  WHERE proname = 'pg_logical_emit_message')",
        (schema, function_names(settings.table_parts)[1], sql.Identifier(*keys).as_string(conn)),
    ).fetchone()
    emit_public, key_public, raw_public = row if row is not None else (False, False, False)
    warnings = []
    if emit_public:
        warnings.append(
            f"{emit} is executable by PUBLIC: any role can publish through the relay; "
            f"REVOKE EXECUTE ON FUNCTION {emit} FROM PUBLIC and grant it with "
            "`cdc-relay init --grant-emit-to ROLE`"
        )
    if key_public:
        warnings.append(
            f"the emit key table {key_name} is readable by PUBLIC: any role can sign messages; "
            f"REVOKE ALL ON {key_name} FROM PUBLIC, then replace the key (docs/operations.md)"
        )
    if raw_public:
        warnings.append(
            f"any role may call pg_logical_emit_message: the relay dead-letters messages with "
            f"prefix {settings.message_prefix!r} that {emit} did not sign (never publishes "
            "them), but cannot stop them filling the dead-letter table; REVOKE EXECUTE on "
            "pg_logical_emit_message FROM PUBLIC if nothing else needs it"
        )
    return warnings


def _relay_health(
    conn: psycopg.Connection[Any], settings: Settings, problems: list[str]
) -> state.RelayHealth | None:
    """What the running relay last reported in its state row (None: nothing fresh to read)."""
    table = state.table_name(settings)
    try:
        health = state.read_health(conn, table, settings.slot)
    except psycopg.errors.InsufficientPrivilege:
        return None  # an older grant: status still answers from the catalogs
    except TIMEOUT_ERRORS as exc:
        problems.append(could_not_read(f"relay state table {'.'.join(table)}", exc))
        return None
    return health if health is not None and health.fresh else None


def _confirmed_commit_age(conn: psycopg.Connection[Any], settings: Settings) -> float | None:
    """Seconds since the newest commit the relay confirmed (None: none recorded, or unreadable).

    With WAL unconfirmed, the oldest unconfirmed change committed after that one:
    this is how far behind the relay is in time, at most.
    """
    table = state.table_name(settings)
    try:
        if not state.exists(conn, table):
            return None
        row = conn.execute(
            sql.SQL(
                "SELECT extract(epoch FROM now() - confirmed_commit_at)::float8 FROM {}"
                " WHERE slot_name = %s"
            ).format(qualified(*table)),
            (settings.slot,),
        ).fetchone()
    except (psycopg.errors.InsufficientPrivilege, *TIMEOUT_ERRORS):
        return None  # an older grant or a lock: the lag in bytes is still known
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


def _not_attached(slot: str, health: state.RelayHealth | None) -> str:
    """The slot is inactive: say so, unless a relay reported recently (between sessions)."""
    if health is None or health.age is None:
        return f"no relay is attached to slot {slot}"
    said = f"{health.problem}" if health.problem else "between sessions, reconnecting"
    return (
        f"no relay holds slot {slot} right now, but a relay reported "
        f"{health.age.total_seconds():.0f}s ago: {said}"
    )


DEFAULT_MAX_STALL: Final = timedelta(seconds=120)
"""``status --max-stall``: longer than a slow broker's confirm (--confirm-timeout,
30 s by default) plus a session's reconnect backoff (up to 30 s), so a healthy relay
that just recovered is not called stalled, yet short enough for a cron probe to
page within a few minutes of a broker alarm."""


def _relay_reports(health: state.RelayHealth | None, max_stall: timedelta | None) -> list[str]:
    """The running relay's own trouble, as status problems (it cannot be seen in the catalogs)."""
    if health is None:
        return []
    found = []
    if health.problem:
        since = state.format_since(health.problem_since) if health.problem_since else "?"
        found.append(f"the relay reports (since {since}): {health.problem}")
    if health.broker_blocked_since is not None:
        found.append(
            "RabbitMQ has blocked the relay's connection since "
            f"{state.format_since(health.broker_blocked_since)} (a memory or disk alarm): "
            "nothing is delivered until it clears (rabbitmq-diagnostics alarms)"
        )
    if max_stall is not None and health.waiting_since is not None and health.age is not None:
        assert health.heartbeat_at is not None
        waited = health.heartbeat_at + health.age - health.waiting_since
        if waited > max_stall:
            found.append(
                f"the relay's confirmed position has not moved for {waited.total_seconds():.0f}s "
                f"with messages waiting (--max-stall {max_stall.total_seconds():.0f}s)"
            )
    return found


def _wal_retention(slot: str, wal_status: str | None, retained: int | None) -> str:
    """What the slot's ``wal_status`` means for the operator ("" when nothing to say).

    ``unreserved`` is an outage announced in advance: the next checkpoint removes
    WAL the slot still needs (``lost`` is reported by validation).
    """
    held = f"{retained:,} bytes" if retained is not None else "more WAL than allowed"
    if wal_status == "unreserved":
        return (
            f"slot {slot} is about to be invalidated (wal_status=unreserved): it holds {held} "
            "of WAL, beyond max_slot_wal_keep_size, and the next checkpoint removes what it "
            "still needs unless the relay catches up first; afterwards only `cdc-relay resync` "
            "recovers (docs/recovery.md)"
        )
    if wal_status == "extended":
        return (
            f"slot {slot} holds {held} of WAL, beyond max_wal_size (wal_status=extended): "
            "the relay is far behind or stopped; see safe_wal_size for the room left"
        )
    return ""


def _client_of(conn: psycopg.Connection[Any], pid: int | None) -> str | None:
    """Which relay holds the slot: its application_name and address (walsender ``pid``).

    With active/standby relays this is the one streaming; the others wait for it.
    """
    if pid is None:
        return None
    row = conn.execute(
        "SELECT application_name, coalesce(host(client_addr), 'local'), client_port"
        " FROM pg_stat_replication WHERE pid = %s",
        (pid,),
    ).fetchone()
    return None if row is None else f"{row[0]} at {row[1]}:{row[2]}"


def _in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def _slot_flags(conn: psycopg.Connection[Any], slot: str) -> dict[str, bool | None]:
    """failover/synced/temporary of a slot; None for what this server version lacks."""
    if conn.info.server_version < FAILOVER_MIN_VERSION:
        row = conn.execute(
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        temporary = None if row is None else bool(row[0])
        return {"failover": None, "synced": None, "temporary": temporary}
    row = conn.execute(
        "SELECT failover, synced, temporary FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return {"failover": None, "synced": None, "temporary": None}
    return {"failover": bool(row[0]), "synced": bool(row[1]), "temporary": bool(row[2])}


def _failover_warnings(conn: psycopg.Connection[Any], slot: str) -> list[str]:
    """Why a failover slot on this primary could still lose or invent events at a failover."""
    row = conn.execute("SHOW synchronized_standby_slots").fetchone()
    names = [n.strip() for n in (row[0] if row else "").split(",") if n.strip()]
    if not names:
        return [
            f"slot {slot} is a failover slot but synchronized_standby_slots is empty: the relay "
            "may publish changes a promoted standby never received (phantom events); set "
            "synchronized_standby_slots = '<the standby's physical slot>' on the primary"
        ]
    warnings = []
    rows = conn.execute(
        "SELECT slot_name, slot_type, active FROM pg_replication_slots WHERE slot_name = ANY(%s)",
        (names,),
    ).fetchall()
    known = {name: (slot_type, active) for name, slot_type, active in rows}
    for name in names:
        if name not in known or known[name][0] != "physical":
            warnings.append(
                f"synchronized_standby_slots names {name}, which is not a physical slot here: "
                "logical decoding waits for it"
            )
        elif not known[name][1]:
            warnings.append(
                f"standby slot {name} (synchronized_standby_slots) is not active: the relay "
                "receives nothing until that standby streams again or the slot is removed "
                "from synchronized_standby_slots"
            )
    return warnings


def standby_status(conn: psycopg.Connection[Any], settings: Settings) -> SlotStatus:
    """Whether this standby could take over: it holds a sync-ready copy of the slot.

    Only ``synced AND NOT temporary`` survives promotion; a temporary copy (the
    standby is still behind the primary's catalog xmin) is dropped when promoted,
    and the relay would then find no slot at all.
    """
    flags = _slot_flags(conn, settings.slot)
    info = slot_info(conn, settings.slot)
    replay = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
    ready = bool(flags["synced"]) and flags["temporary"] is False
    result = SlotStatus(
        role="standby",
        slot=settings.slot,
        slot_exists=info is not None,
        standby=StandbySlot(
            failover=flags["failover"],
            synced=flags["synced"],
            temporary=flags["temporary"],
            failover_ready=ready,
            confirmed_flush_lsn=info.confirmed_flush_lsn if info else None,
            replay_lsn=replay[0] if replay else None,
        ),
    )
    problems = result.problems
    if conn.info.server_version < FAILOVER_MIN_VERSION:
        problems.append(
            "this is a standby of PostgreSQL < 17: it cannot hold a copy of a logical slot, "
            "so the relay cannot continue after a promotion (see docs/ha.md)"
        )
    elif info is None:
        problems.append(
            f"this standby holds no copy of slot {settings.slot}: create the slot with "
            "`cdc-relay init --failover` and set sync_replication_slots = on, "
            "hot_standby_feedback = on and dbname in primary_conninfo here"
        )
    elif not ready:
        problems.append(
            f"this standby's copy of slot {settings.slot} is not sync-ready yet (synced="
            f"{flags['synced']}, temporary={flags['temporary']}): a temporary copy is dropped "
            "at promotion; it becomes persistent once the relay confirms past a standby snapshot"
            " (SELECT pg_log_standby_snapshot() on the primary)"
        )
    return result

"""``cdc-relay dead-letters replay``: re-publish pending dead letters.

Replay publishes with confirms and mandatory, under the router's one policy,
and marks a row replayed only after the broker confirmed it: a crash in between
replays it again (at least once, like the relay itself). Rows that still cannot
be routed stay pending, alone; one message per outbox row; one replay at a time.

A dead letter whose stored row was truncated (``deadletters.bounded_row``) is
never published from its prefix: replay reads the row from the outbox table by
its id, or refuses it. The table itself, its writer and ``list``/``prune`` live
in ``cdc_relay.deadletters``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc_relay.amqp import Outcome, Publisher, PublishFailed, UnpublishableMessage
from cdc_relay.config import Settings
from cdc_relay.deadletters import RECORD_COLUMNS, DeadLetterRecord, mark_replayed
from cdc_relay.envelope import Envelope
from cdc_relay.errors import ConfigError, RelayError
from cdc_relay.pg import checks
from cdc_relay.redact import one_line
from cdc_relay.replay_select import Redirect, Selection
from cdc_relay.router import Router
from cdc_relay.rows import OutboxRow, UnmappableRow
from cdc_relay.schema import qualified


def row_from_record(record: DeadLetterRecord) -> OutboxRow:
    """The outbox row a dead letter stored, exactly as it was (UnmappableRow if it cannot be).

    A stored row whose ``truncated`` key names fields was cut to fit the table:
    publishing it would send a different message, so it is refused here and
    ``replay`` reads the row from the outbox instead.
    """
    data = record.row_data
    if "id" not in data:
        raise UnmappableRow("the stored row could not be read as an outbox row")
    truncated = data.get("truncated")
    if truncated:
        raise TruncatedRow(truncated)
    headers = data.get("headers")
    return OutboxRow(
        id=data["id"],
        aggregate_type=data["aggregate_type"],
        aggregate_id=data["aggregate_id"],
        event_type=data["event_type"],
        payload=data["payload"].encode(),
        headers=None if headers is None else headers.encode(),
        exchange=data.get("exchange"),
        routing_key=data.get("routing_key"),
        created_at=data.get("created_at"),
        trace_context=data.get("trace_context"),
        column_headers=data.get("column_headers"),
        properties=data.get("properties"),
    )


class TruncatedRow(UnmappableRow):
    """The stored row lacks part of its fields (``truncated``); only the outbox has them."""

    def __init__(self, fields: Any) -> None:
        names = fields if isinstance(fields, list) else [fields]
        self.fields = [str(f) for f in names]
        super().__init__(f"the stored row has truncated field(s) {', '.join(self.fields)}")


class ReplayBusy(RelayError):
    """Another ``dead-letters replay`` holds this dead-letter table: wait for it, then retry."""

    exit_code = 1


REPLAY_BATCH = 500  # dead letters claimed, published and marked per round
# First key of replay's advisory lock (the second is the table's name): "cdcr".
REPLAY_LOCK_CLASS = 0x63646372


@dataclass(slots=True)
class ReplayGroup:
    """Pending dead letters of one outbox row: one message, and all of them marked replayed.

    ``lead`` is the one whose row is published: the oldest with a whole stored
    row, else the oldest (its row is then read from the outbox).
    """

    lead: DeadLetterRecord
    records: list[DeadLetterRecord]


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """One dead letter's outcome: ``error`` None when confirmed (or, in a dry run, routable).

    ``exchange`` and ``routing_key`` are where its row went (or would go); None
    when it could not be routed.
    """

    record: DeadLetterRecord
    error: str | None
    exchange: str | None = None
    routing_key: str | None = None


def group_by_outbox_row(records: Iterable[DeadLetterRecord]) -> list[ReplayGroup]:
    """One group per outbox row, in the order of each group's oldest dead letter.

    The same outbox row may be dead-lettered more than once (in two sessions
    around a restart); publishing each copy would deliver it twice. A dead
    letter without an outbox id (an unreadable message) is a group of its own.
    """
    groups: dict[object, ReplayGroup] = {}
    for record in sorted(records, key=lambda r: r.id):
        key: object = record.id if record.outbox_id is None else record.outbox_id
        group = groups.get(key)
        if group is None:
            groups[key] = ReplayGroup(record, [record])
            continue
        group.records.append(record)
        if group.lead.row_data.get("truncated") and not record.row_data.get("truncated"):
            group.lead = record
    return list(groups.values())


def _claim(conn: psycopg.Connection[Any], table: tuple[str, str]) -> None:
    """Take the table's replay lock (a session advisory lock), or raise ReplayBusy.

    Two replays at once would both publish every row: the second one refuses in
    one line instead. The lock dies with the session, so a killed replay never
    leaves it behind.
    """
    name = ".".join(table)
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (REPLAY_LOCK_CLASS, name)
    ).fetchone()
    if row is not None and row[0]:
        return
    holder = conn.execute(
        "SELECT string_agg(pid::text, ', ') FROM pg_locks WHERE locktype = 'advisory'"
        " AND granted AND objsubid = 2 AND classid = %s::int::oid"
        " AND objid = hashtext(%s)::oid",
        (REPLAY_LOCK_CLASS, name),
    ).fetchone()
    pid = f" (pid {holder[0]})" if holder and holder[0] else ""
    raise ReplayBusy(
        f"another dead-letters replay is running on {name}{pid}; wait for it to finish, "
        "then run replay again for what it left pending"
    )


def _release(conn: psycopg.Connection[Any], table: tuple[str, str]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute(
            "SELECT pg_advisory_unlock(%s, hashtext(%s))", (REPLAY_LOCK_CLASS, ".".join(table))
        )


def _pending_after(
    conn: psycopg.Connection[Any],
    table: tuple[str, str],
    after: int,
    selection: Selection,
    limit: int,
) -> tuple[list[DeadLetterRecord], list[DeadLetterRecord]]:
    """The next selected dead letters by id, and the other pending ones of their outbox rows."""
    where, params = selection.where()
    rows = conn.execute(
        sql.SQL("{} FROM {} WHERE {} AND id > %s ORDER BY id LIMIT %s").format(
            RECORD_COLUMNS, qualified(*table), where
        ),
        [*params, after, limit],
    ).fetchall()
    records = [DeadLetterRecord(*r) for r in rows]
    outbox_ids = sorted({r.outbox_id for r in records if r.outbox_id is not None})
    if not outbox_ids:
        return records, []
    known = {r.id for r in records}
    siblings = conn.execute(
        sql.SQL("{} FROM {} WHERE replayed_at IS NULL AND outbox_id = ANY(%s)").format(
            RECORD_COLUMNS, qualified(*table)
        ),
        (outbox_ids,),
    ).fetchall()
    return records, [DeadLetterRecord(*r) for r in siblings if r[0] not in known]


def _route(
    conn: psycopg.Connection[Any],
    settings: Settings,
    router: Router,
    redirect: Redirect,
    group: ReplayGroup,
) -> Envelope:
    """The message for a group's outbox row (raises UnmappableRow and friends when none)."""
    lead = group.lead
    try:
        row = row_from_record(lead)
    except TruncatedRow as exc:
        row = _reread(conn, settings, exc, lead.outbox_id)
    return router.route(redirect.apply(row))


UNROUTABLE: Final = (UnmappableRow, KeyError, AttributeError, TypeError)
"""What routing a stored row may raise: that row stays pending, alone."""


def _reread(
    conn: psycopg.Connection[Any],
    settings: Settings,
    truncated: TruncatedRow,
    outbox_id: str | None,
) -> OutboxRow:
    """The outbox row itself, for a dead letter whose stored copy was truncated."""
    table = ".".join(settings.table_parts)
    if outbox_id is None:
        raise UnmappableRow(f"{truncated} and no outbox id to read it again from {table}")
    try:
        try:
            reading = checks.text_rows(conn, settings)
        except ConfigError as exc:
            raise UnmappableRow(f"{truncated}, and {exc}") from None
        values = conn.execute(
            sql.SQL("SELECT {} FROM {} WHERE {} = %s").format(
                reading.select, qualified(*settings.table_parts), reading.id
            ),
            (outbox_id,),
        ).fetchone()
    except psycopg.Error as exc:
        hint = ""
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            hint = "; run replay as a role that may SELECT it"
        raise UnmappableRow(
            f"{truncated}, and reading the row from {table} failed: "
            f"{one_line(str(exc)) or type(exc).__name__}{hint}"
        ) from None
    if values is None:
        raise UnmappableRow(f"{truncated}, and the row is no longer in {table} (pruned?)")
    return reading.read(values)


class _Round:
    """What the broker said about the publishes since ``reset``, by the lead's id."""

    def __init__(self) -> None:
        self.outcomes: dict[int, str | None] = {}
        self.lost: PublishFailed | None = None

    def reset(self) -> None:
        self.outcomes = {}
        self.lost = None

    def on_outcome(self, outcome: Outcome) -> None:
        for seq in outcome.confirmed:
            self.outcomes[seq] = None
        for seq, error in outcome.failed:
            self.outcomes[seq] = error.reason
        if outcome.lost is not None and self.lost is None:
            self.lost = outcome.lost


def _selected(
    conn: psycopg.Connection[Any],
    table: tuple[str, str],
    selection: Selection,
    batch: int,
    seen: Container[int],
) -> Iterator[list[DeadLetterRecord]]:
    """Rounds of selected dead letters not ``seen`` (with their rows' siblings), to the limit.

    A sibling handled in an earlier round is not taken again, nor counted.
    """
    after = taken = 0
    while size := selection.take(taken, batch):
        primary, siblings = _pending_after(conn, table, after, selection, size)
        if not primary:
            return
        after = primary[-1].id
        fresh = [r for r in primary if r.id not in seen]
        taken += len(fresh)
        yield [r for r in fresh + siblings if r.id not in seen]


def dry_run(
    conn: psycopg.Connection[Any],
    settings: Settings,
    selection: Selection,
    redirect: Redirect | None = None,
    *,
    batch: int = REPLAY_BATCH,
) -> list[ReplayOutcome]:
    """What ``replay`` would take and where each row would go; publishes and marks nothing.

    The same selection and routing (policy included) as ``replay``; only what
    the broker would say (a missing exchange) is not known without publishing.
    """
    router = Router.from_settings(settings)
    redirect = redirect or Redirect()
    results: dict[int, ReplayOutcome] = {}
    for records in _selected(conn, settings.dead_letter_table, selection, batch, results):
        for group in group_by_outbox_row(records):
            try:
                envelope = _route(conn, settings, router, redirect, group)
            except UNROUTABLE as exc:
                for record in group.records:
                    results[record.id] = ReplayOutcome(record, f"still not mappable: {exc}")
                continue
            for record in group.records:
                results[record.id] = ReplayOutcome(
                    record, None, envelope.exchange, envelope.routing_key
                )
    return [results[k] for k in sorted(results)]


async def replay(
    conn: psycopg.Connection[Any],
    settings: Settings,
    ids: list[int] | None = None,
    *,
    batch: int = REPLAY_BATCH,
    selection: Selection | None = None,
    redirect: Redirect | None = None,
    on_round: Callable[[int], None] | None = None,
) -> list[ReplayOutcome]:
    """Re-publish the selected pending dead letters (all by default); one outcome each, by id.

    Converges: each outbox row is published once however many dead letters it
    has, and all of them are marked replayed once the broker confirmed it; a
    refused exchange (the policy, 404, 403) or an unmappable row fails only its
    own dead letters; one replay at a time per table (``ReplayBusy``); each
    round of ``batch`` is marked as soon as it is confirmed, so a second run
    after success publishes nothing. The other pending dead letters of a
    selected outbox row are marked too: the row was delivered.
    """
    table = settings.dead_letter_table
    selection = selection if selection is not None else Selection.of_ids(ids)
    redirect = redirect or Redirect()
    router = Router.from_settings(settings)
    _claim(conn, table)
    rounds = _Round()
    publisher = Publisher.from_settings(settings, rounds.on_outcome, max_in_flight=100)
    results: dict[int, ReplayOutcome] = {}
    refusals: dict[str, str | None] = {}  # exchange -> why the broker refuses it, or None
    interrupted: BaseException | None = None
    try:
        try:
            await publisher.connect()
        except Exception as exc:
            raise ConfigError(
                f"cannot connect to RabbitMQ ({type(exc).__name__}: {one_line(str(exc))}); "
                "check --amqp-url"
            ) from None
        for records in _selected(conn, table, selection, batch, results):
            settled, interrupted = await _replay_round(
                conn, settings, router, redirect, publisher, rounds, records, refusals
            )
            done: list[int] = []
            for group, error, envelope in settled:
                exchange = envelope.exchange if envelope is not None else None
                key = envelope.routing_key if envelope is not None else None
                for record in group.records:
                    results[record.id] = ReplayOutcome(record, error, exchange, key)
                    if error is None:
                        done.append(record.id)
            if done:
                mark_replayed(conn, table, done)
            if on_round is not None:
                on_round(len(results))  # dead letters settled so far
            if interrupted is not None:
                break
    finally:
        await publisher.close()
        _release(conn, table)
    if interrupted is not None:
        confirmed = sum(r.error is None for r in results.values())
        raise ConfigError(
            f"replay interrupted ({type(interrupted).__name__}: {one_line(str(interrupted))}); "
            f"{confirmed} confirmed dead letter(s) were marked replayed, the rest stay pending"
        )
    return [results[k] for k in sorted(results)]


async def _replay_round(
    conn: psycopg.Connection[Any],
    settings: Settings,
    router: Router,
    redirect: Redirect,
    publisher: Publisher,
    rounds: _Round,
    records: list[DeadLetterRecord],
    refusals: dict[str, str | None],
) -> tuple[list[tuple[ReplayGroup, str | None, Envelope | None]], BaseException | None]:
    """Publish one message per outbox row of ``records``; each group's outcome.

    A publish the broker refuses by closing the channel (403, 404, 406) fails
    the group that caused it and every group bound for that exchange; the
    publisher reconnects and the unsettled rest is sent again. Anything else
    (a lost connection, no confirm) interrupts: the groups settled so far are
    returned with it, the others stay pending.
    """
    outcome: dict[int, str | None] = {}  # by the lead's id
    to_send: list[tuple[ReplayGroup, Envelope]] = []
    groups = group_by_outbox_row(records)
    envelopes: dict[int, Envelope] = {}  # by the lead's id
    for group in groups:
        try:
            envelope = _route(conn, settings, router, redirect, group)
        except UNROUTABLE as exc:
            outcome[group.lead.id] = f"still not mappable: {exc}"
            continue
        envelopes[group.lead.id] = envelope
        to_send.append((group, envelope))
    interrupted: BaseException | None = None
    while to_send:
        rounds.reset()
        for group, envelope in to_send:
            seq = group.lead.id
            refused = await publisher.exchange_refusal(envelope.exchange, refusals)
            if refused is not None:
                outcome[seq] = refused
                continue
            try:
                await publisher.publish(seq, envelope)
            except UnpublishableMessage as exc:
                outcome[seq] = str(exc)
            except PublishFailed:
                break  # the channel is gone: rounds.lost says why
        confirmed = await publisher.wait_confirmed(settings.confirm_timeout)
        outcome.update(rounds.outcomes)
        lost = rounds.lost
        if confirmed and lost is None:
            break
        if lost is None or (lost.refused_exchange is None and lost.culprit_seq is None):
            interrupted = lost or PublishFailed(f"no confirm within {settings.confirm_timeout:g}s")
            break
        if lost.refused_exchange is not None:
            refusals[lost.refused_exchange] = (
                f"exchange {lost.refused_exchange!r} refused by the broker: {lost.reason}"
            )
        if lost.culprit_seq is not None:
            outcome[lost.culprit_seq] = lost.reason
        to_send = [(g, e) for g, e in to_send if g.lead.id not in outcome]
        try:
            await publisher.connect()
        except Exception as exc:
            interrupted = exc
            break
    settled = [
        (g, outcome[g.lead.id], envelopes.get(g.lead.id)) for g in groups if g.lead.id in outcome
    ]
    return settled, interrupted

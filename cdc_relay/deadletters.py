"""List and replay rows that the relay could not publish.

Replay publishes with confirms and mandatory, and marks a row replayed only
after the broker confirmed it: a crash in between replays it again (at least
once, like the relay itself). Rows that still cannot be routed stay pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from cdc_relay.amqp import Outcome, Publisher
from cdc_relay.config import Settings
from cdc_relay.pg.admin import qualified
from cdc_relay.router import OutboxRow, Router, UnmappableRow


@dataclass(slots=True)
class DeadLetterRecord:
    id: int
    outbox_id: str
    reason: str
    row_data: dict[str, Any]
    lsn: str
    created_at: str
    replayed_at: str | None


def list_dead_letters(
    conn: psycopg.Connection[Any], settings: Settings, *, include_replayed: bool = False
) -> list[DeadLetterRecord]:
    where = sql.SQL("") if include_replayed else sql.SQL(" WHERE replayed_at IS NULL")
    rows = conn.execute(
        sql.SQL(
            "SELECT id, outbox_id::text, reason, row_data, lsn::text, created_at::text,"
            " replayed_at::text FROM {}{} ORDER BY id"
        ).format(qualified(*settings.dead_letter_table), where)
    ).fetchall()
    return [DeadLetterRecord(*r) for r in rows]


def row_from_record(record: DeadLetterRecord) -> OutboxRow:
    data = record.row_data
    if "id" not in data:
        raise UnmappableRow("the stored row could not be read as an outbox row")
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
    )


async def replay(
    settings: Settings, ids: list[int] | None = None
) -> list[tuple[DeadLetterRecord, str | None]]:
    """Re-publish pending dead letters; returns (record, error or None) for each."""
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        records = [r for r in list_dead_letters(conn, settings) if ids is None or r.id in set(ids)]
        router = Router(settings.exchange, settings.routing_key, settings.message_format)
        outcomes: dict[int, str | None] = {}

        def on_outcome(outcome: Outcome) -> None:
            for seq in outcome.confirmed:
                outcomes[seq] = None
            for seq, error in outcome.failed:
                outcomes[seq] = error.reason
            if outcome.lost is not None:
                for seq in pending:
                    outcomes.setdefault(seq, outcome.lost.reason)

        pending: list[int] = []
        publisher = Publisher(
            settings.amqp_urls,
            max_in_flight=100,
            confirm_timeout=settings.confirm_timeout,
            on_outcome=on_outcome,
        )
        await publisher.connect()
        try:
            for record in records:
                try:
                    envelope = router.route(row_from_record(record))
                except (UnmappableRow, KeyError, AttributeError) as exc:
                    outcomes[record.id] = f"still not mappable: {exc}"
                    continue
                pending.append(record.id)
                await publisher.publish(record.id, envelope)
            await publisher.wait_confirmed(settings.confirm_timeout)
        finally:
            await publisher.close()
        table = qualified(*settings.dead_letter_table)
        results: list[tuple[DeadLetterRecord, str | None]] = []
        for record in records:
            error = outcomes.get(record.id, "no confirm received")
            if error is None:
                conn.execute(
                    sql.SQL("UPDATE {} SET replayed_at = now() WHERE id = %s").format(table),
                    (record.id,),
                )
            results.append((record, error))
        return results


def record_as_json(record: DeadLetterRecord) -> bytes:
    return orjson.dumps(
        {
            "id": record.id,
            "outbox_id": record.outbox_id,
            "reason": record.reason,
            "lsn": record.lsn,
            "created_at": record.created_at,
            "replayed_at": record.replayed_at,
            "row": record.row_data,
        }
    )

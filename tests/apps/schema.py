"""Throwaway outbox and inbox tables for app-side tests, from the shipped DDL."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from cdc_relay.outbox import outbox_ddl as product_outbox_ddl
from cdc_relay.rows import OutboxRow


def outbox_ddl(table: str) -> str:
    """The outbox CREATE TABLE that ``cdc-relay init`` runs, for another table name."""
    return product_outbox_ddl(table)


def unique_table(prefix: str = "outbox") -> str:
    return f"public.{prefix}_{uuid.uuid4().hex[:8]}"


def create_outbox(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(outbox_ddl(table))


def drop_table(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def read_rows(dsn: str, table: str, ids: list[str] | None = None) -> list[OutboxRow]:
    """Rows as the relay's decoder would hand them to the router (text, payload bytes)."""
    query = (
        "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text,"
        f" headers::text, exchange, routing_key, created_at::text FROM {table}"
    )
    params: tuple[Any, ...] = ()
    if ids is not None:
        query += " WHERE id = ANY(%s::uuid[])"
        params = (ids,)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        rows = conn.execute(query + " ORDER BY created_at, id", params).fetchall()
    return [
        OutboxRow(r[0], r[1], r[2], r[3], r[4].encode(), r[5].encode(), r[6], r[7], r[8])
        for r in rows
    ]

"""Throwaway outbox and inbox tables for app-side tests, from the shipped DDL."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import psycopg

from cdc_relay.router import OutboxRow

ROOT = Path(__file__).resolve().parents[2]
# The DDL moves to package data (cdc_relay/sql/); either place is the contract.
DDL_FILES = (ROOT / "cdc_relay" / "sql" / "outbox.sql", ROOT / "sql" / "outbox.sql")


def outbox_ddl(table: str) -> str:
    """The outbox CREATE TABLE of the shipped DDL, for another table name."""
    path = next(p for p in DDL_FILES if p.exists())
    text = path.read_text()
    match = re.search(r"CREATE TABLE IF NOT EXISTS public\.outbox \(.*?\n\);", text, re.S)
    assert match, f"no outbox CREATE TABLE in {path}"
    return match.group(0).replace("public.outbox", table, 1)


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

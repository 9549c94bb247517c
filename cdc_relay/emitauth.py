"""Emitted messages (``outbox_emit``): whether the emit function wrote them, and their row.

Pure: the key comes from the caller (``pg.checks`` reads it at startup) and
the core calls both functions once per emitted message. The MAC rule here is
the one the emit function's SQL (``schema.emit_function_ddl``) signs with.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

import orjson

from cdc_relay.rows import OutboxRow, UnmappableRow

_MESSAGE_FIELDS: Final = ("id", "aggregate_type", "aggregate_id", "event_type")

EMIT_AUTH_FAILED: Final = (
    "emitted message failed authentication: not signed with the outbox's emit key "
    "(written by pg_logical_emit_message directly, not by the emit function); not published"
)
MAC_HEX_SIZE: Final = 64  # hex HMAC-SHA256 in front of the JSON the emit function writes


def authenticated(content: bytes, key: bytes | None) -> bytes | None:
    """The JSON of a message the emit function signed, or None when the signature fails.

    Any role may call ``pg_logical_emit_message`` with our prefix; only the
    emit function (SECURITY DEFINER) can read the key, so a valid HMAC-SHA256
    proves the message came through it. Without a key nothing is authentic.
    """
    if key is None or len(content) < MAC_HEX_SIZE:
        return None
    body = content[MAC_HEX_SIZE:]
    expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode("ascii")
    return body if hmac.compare_digest(expected, content[:MAC_HEX_SIZE]) else None


def row_from_message(content: bytes) -> OutboxRow:
    """The JSON object ``outbox_emit`` writes, as the row the table would have held.

    ``payload`` and ``headers`` arrive as the text of their jsonb values, so the
    body is byte-for-byte what a table row with the same payload gives.
    """
    data = orjson.loads(content)
    if not isinstance(data, dict):
        raise UnmappableRow("logical message content is not a JSON object")
    missing = [k for k in (*_MESSAGE_FIELDS, "payload") if not isinstance(data.get(k), str)]
    if missing:
        raise UnmappableRow(f"logical message lacks text field(s): {', '.join(missing)}")
    headers, exchange, routing_key, created_at = (
        data.get(k) for k in ("headers", "exchange", "routing_key", "created_at")
    )
    return OutboxRow(
        data["id"],
        data["aggregate_type"],
        data["aggregate_id"],
        data["event_type"],
        data["payload"].encode(),
        headers.encode() if isinstance(headers, str) else None,
        exchange if isinstance(exchange, str) else None,
        routing_key if isinstance(routing_key, str) else None,
        created_at if isinstance(created_at, str) else None,
    )


__all__ = ["EMIT_AUTH_FAILED", "MAC_HEX_SIZE", "authenticated", "row_from_message"]

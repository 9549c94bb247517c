"""Which dead letters ``dead-letters replay`` takes, and where it sends them.

``Selection`` is the filter (ids, a dead-lettering time window, a reason
substring, a limit) as one SQL condition, so the dry run and the replay select
exactly the same rows; ``Redirect`` replaces a row's exchange and routing key
before routing, so the router's one policy (``--allowed-exchanges``, key
checks) still applies to where it goes. No I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from cdc_relay.rows import OutboxRow


@dataclass(frozen=True, slots=True)
class Selection:
    """Pending dead letters to replay: all of them unless narrowed.

    ``since`` is inclusive and ``until`` exclusive, on the time the row was
    dead-lettered (``created_at`` of the dead letter); ``reason`` matches a
    substring, ignoring case; ``limit`` caps the dead letters taken (oldest
    first). The other pending dead letters of a selected outbox row are still
    marked once it is delivered: one message per outbox row.
    """

    ids: tuple[int, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    reason: str | None = None
    limit: int | None = None

    def where(self) -> tuple[sql.Composable, list[Any]]:
        """The SQL condition (after ``replayed_at IS NULL``) and its parameters."""
        parts: list[sql.Composable] = [sql.SQL("replayed_at IS NULL")]
        params: list[Any] = []
        if self.ids is not None:
            parts.append(sql.SQL("id = ANY(%s)"))
            params.append(list(self.ids))
        if self.since is not None:
            parts.append(sql.SQL("created_at >= %s"))
            params.append(self.since)
        if self.until is not None:
            parts.append(sql.SQL("created_at < %s"))
            params.append(self.until)
        if self.reason:
            parts.append(sql.SQL("strpos(lower(reason), lower(%s)) > 0"))
            params.append(self.reason)
        return sql.SQL(" AND ").join(parts), params

    def take(self, taken: int, batch: int) -> int:
        """How many to read in the next round, after ``taken`` (0: the limit is reached)."""
        if self.limit is None:
            return batch
        return max(0, min(batch, self.limit - taken))

    @classmethod
    def of_ids(cls, ids: Sequence[int] | None) -> Selection:
        return cls(ids=None if ids is None else tuple(ids))


@dataclass(frozen=True, slots=True)
class Redirect:
    """``--to-exchange`` / ``--to-routing-key``: send the selected rows elsewhere."""

    exchange: str | None = None
    routing_key: str | None = None

    def apply(self, row: OutboxRow) -> OutboxRow:
        """The row as if it had named this exchange and routing key itself."""
        changes: dict[str, Any] = {}
        if self.exchange is not None:
            changes["exchange"] = self.exchange
        if self.routing_key is not None:
            changes["routing_key"] = self.routing_key
        return dataclasses.replace(row, **changes) if changes else row

"""``dead-letters replay``'s selection options and what ``dead-letters`` commands print.

Kept out of ``cli.py`` so the command functions stay a few lines: the options
become a ``Selection`` and a ``Redirect`` (``cdc_relay.replay_select``), and the
outcomes are written as text (one tab-separated line each, under a header) or
JSON Lines (one object per dead letter), like every other list output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson

from cdc_relay.logs import escape_controls
from cdc_relay.replay_select import Redirect, Selection

if TYPE_CHECKING:  # the replay machinery (amqp, router) loads only for replay itself
    from cdc_relay.replay import ReplayOutcome

F = TypeVar("F", bound=Callable[..., Any])

REPLAY_HEADER = ("id", "outbox_id", "outcome", "exchange", "routing_key", "error")


class Timestamp(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.5
    """An ISO 8601 time; a bare one is UTC (`resync --since`, replay's `--since`/`--until`)."""

    name = "timestamp"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from cdc_relay.resync import parse_since

        if isinstance(value, datetime):
            return value
        try:
            return parse_since(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def replay_options(fn: F) -> F:
    """The options that choose which dead letters ``replay`` takes and where they go."""
    options = [
        click.option("--id", "ids", multiple=True, type=int, help="Only these (repeatable)."),
        click.option(
            "--since",
            type=Timestamp(),
            default=None,
            help="Only those dead-lettered at or after this time (ISO 8601; bare = UTC).",
        ),
        click.option(
            "--until",
            type=Timestamp(),
            default=None,
            help="Only those dead-lettered before this time (ISO 8601; bare = UTC).",
        ),
        click.option(
            "--reason", metavar="TEXT", help="Only those whose reason contains TEXT (any case)."
        ),
        click.option(
            "--limit", type=click.IntRange(1), default=None, help="At most N, oldest first."
        ),
        click.option(
            "--to-exchange",
            metavar="NAME",
            default=None,
            help="Publish to this exchange instead of the row's (still --allowed-exchanges).",
        ),
        click.option(
            "--to-routing-key",
            metavar="KEY",
            default=None,
            help="Publish with this routing key instead of the row's or the template's.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Say which dead letters would be published and where; publish and mark nothing.",
        ),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def selection_of(
    ids: Sequence[int],
    since: datetime | None,
    until: datetime | None,
    reason: str | None,
    limit: int | None,
) -> Selection:
    """The options as a ``Selection``; an empty window is a usage error, not zero rows."""
    if since is not None and until is not None and since >= until:
        raise click.UsageError(f"--since {since.isoformat()} is not before --until")
    return Selection(
        ids=tuple(ids) if ids else None, since=since, until=until, reason=reason, limit=limit
    )


def outcome_word(outcome: ReplayOutcome, dry_run: bool) -> str:
    """``replayed``/``failed``, or in a dry run ``would replay``/``would fail``."""
    ok = outcome.error is None
    if dry_run:
        return "would replay" if ok else "would fail"
    return "replayed" if ok else "failed"


def outcome_as_json(outcome: ReplayOutcome, dry_run: bool) -> str:
    """One dead letter's outcome as a JSON object (one line)."""
    record = outcome.record
    return orjson.dumps(
        {
            "id": record.id,
            "outbox_id": record.outbox_id,
            "created_at": record.created_at,
            "reason": record.reason,
            "outcome": outcome_word(outcome, dry_run).replace(" ", "_"),
            "dry_run": dry_run,
            "exchange": outcome.exchange,
            "routing_key": outcome.routing_key,
            "error": outcome.error,
        }
    ).decode()


def outcome_as_text(outcome: ReplayOutcome, dry_run: bool) -> str:
    """One tab-separated line under ``REPLAY_HEADER`` (control characters escaped)."""
    record = outcome.record
    fields = (
        record.id,
        record.outbox_id or "-",
        outcome_word(outcome, dry_run),
        "-" if outcome.exchange is None else outcome.exchange or "(default)",
        outcome.routing_key if outcome.routing_key is not None else "-",
        outcome.error or "-",
    )
    return "\t".join(escape_controls(str(field)) for field in fields)


def summary(outcomes: Sequence[ReplayOutcome], dry_run: bool) -> str:
    """The closing line on stderr."""
    failed = sum(o.error is not None for o in outcomes)
    if dry_run:
        return f"dry run: {len(outcomes) - failed} would be replayed, {failed} would fail"
    return f"{len(outcomes) - failed} replayed, {failed} failed"


def redirect_of(to_exchange: str | None, to_routing_key: str | None) -> Redirect:
    return Redirect(exchange=to_exchange, routing_key=to_routing_key)
